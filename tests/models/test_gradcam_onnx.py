"""Exported models against torch: probability within 1e-4, Grad-CAM and HiResCAM Pearson
r >= 0.99."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.architectures import CNN3, Classifier, ResNet18, build
from models.gradcam import autograd_cams
from services.core.inference.preprocess import Preprocessing
from services.lab.training.train import export_onnx, gradcam_shape

SHAPE = Preprocessing.for_training_geometry(416, 512).input_shape


def trained_like(architecture: str) -> Classifier:
    """Random weights and BatchNorm statistics that are not the identity."""
    torch.manual_seed(1)
    model = build(architecture, SHAPE)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(6, 1, *SHAPE) * 0.8)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=["cnn3", "resnet18"])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Classifier, ort.InferenceSession]:
    model = trained_like(request.param)
    path = Path(tmp_path_factory.mktemp(request.param)) / "model.onnx"
    export_onnx(model, SHAPE, path)
    return model, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def inputs(n: int, seed: int) -> np.ndarray:
    """Phantom-like inputs: smooth background with bright blobs at random places."""
    rng = np.random.default_rng(seed)
    h, w = SHAPE
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, 1, h, w), dtype=np.float32)
    for i in range(n):
        img = 0.3 + 0.05 * rng.standard_normal((h, w))
        for _ in range(3):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 20)
            img += rng.uniform(0.2, 0.6) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        out[i, 0] = img
    return out


def test_onnx_outputs_and_dynamic_batch(
    exported: tuple[Classifier, ort.InferenceSession],
) -> None:
    model, session = exported
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["malignancy", "gradcam", "hirescam"]
    for n in (1, 3):
        prob, *cams = session.run(None, {"image": inputs(n, n)})
        assert prob.shape == (n,)
        for cam in cams:
            assert cam.shape == (n, *gradcam_shape(model, SHAPE))
            assert cam.min() >= 0 and cam.max() <= 1 + 1e-6


def test_parity_with_torch_autograd(
    exported: tuple[Classifier, ort.InferenceSession],
) -> None:
    model, session = exported
    x = inputs(20, 7)
    prob, gradcam, hirescam = session.run(None, {"image": x})
    ref_prob, ref_gradcam, ref_hirescam = autograd_cams(model, torch.from_numpy(x))
    np.testing.assert_allclose(prob, ref_prob.numpy(), atol=1e-4)
    for cam, ref in ((gradcam, ref_gradcam), (hirescam, ref_hirescam)):
        rs = []
        for i in range(20):
            a, b = cam[i].ravel(), ref[i].numpy().ravel()
            if a.std() == 0 and b.std() == 0:  # both maps empty: identical
                rs.append(1.0)
                continue
            rs.append(float(np.corrcoef(a, b)[0, 1]))
        assert min(rs) >= 0.99, rs
    if isinstance(model, ResNet18):  # one gradient everywhere: the two maps are the same
        np.testing.assert_allclose(gradcam, hirescam, atol=1e-5)
    else:  # CNN3's head weighs each position on its own: the maps differ
        assert not np.allclose(gradcam, hirescam, atol=1e-3)


def test_gradcam_targets_the_last_conv_block() -> None:
    cnn3 = CNN3(SHAPE)
    resnet = ResNet18(SHAPE)
    a = cnn3.features(torch.zeros(1, 1, *SHAPE))
    assert a.shape[1] == cnn3.conv3.out_channels  # before the last max pool
    assert resnet.features(torch.zeros(1, 1, *SHAPE)).shape[1] == 512


@pytest.mark.parametrize(
    ("architecture", "shape", "cells"),
    [("cnn3", (256, 320), ((3, 4), (4, 6))), ("resnet18", (640, 640), ((9, 10), (10, 11)))],
)
def test_cam_grid_is_where_the_cells_look(
    architecture: str, shape: tuple[int, int], cells: tuple[tuple[int, int], ...]
) -> None:
    """The card's Grad-CAM grid (stride, offset) against the network itself: with positive
    weights and identity BatchNorm nothing cancels, so the cells that respond to a point on the
    input are those whose receptive field holds it, symmetric about the cell centred on it
    (inputs large enough that no receptive field reaches the border)."""
    model = build(architecture, shape).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                module.weight.fill_(0.01)
            if isinstance(module, torch.nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.weight.fill_(1.0)
                module.bias.zero_()
    (sy, sx), (oy, ox) = model.cam_grid()
    assert (sy, sx) == (32, 32)
    for cy, cx in cells:
        y, x = oy + sy * cy, ox + sx * cx  # the centre of cell (cy, cx), maybe half a pixel
        image = torch.zeros(1, 1, *shape)
        rows = sorted({int(np.floor(y)), int(np.ceil(y))})
        cols = sorted({int(np.floor(x)), int(np.ceil(x))})
        image[0, 0, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = 1.0
        with torch.no_grad():
            response = model.features(image)[0].sum(0).numpy()
        hit_rows, hit_cols = np.nonzero(response > 0)
        assert hit_rows.min() + hit_rows.max() == 2 * cy
        assert hit_cols.min() + hit_cols.max() == 2 * cx
