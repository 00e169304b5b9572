"""Tests of the ONNX Runtime classifier, occlusion saliency and breast grouping/classification.

Models are tiny (a random CNN3 on the 256 x 320 phantom geometry, and a hand-made module) and
are exported once per session with torch's dynamo exporter; the service itself never imports
torch.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from torch import Tensor, nn

from models.architectures import CNN3
from models.gradcam import WithGradCam
from services.core.errors import InvalidInput, InvalidParameter, NotFound
from services.core.inference import runtime
from services.core.inference.breasts import (
    Breast,
    breast_inputs,
    classify_breasts,
    group_breasts,
    window_of,
)
from services.core.inference.card import (
    GradCamGrid,
    ModelCard,
    file_sha256,
    load_card,
    write_card,
)
from services.core.inference.preprocess import (
    Preprocessing,
    SaliencyGrid,
    breast_input,
    map_back,
    prepare_view,
    to_input_grid,
)
from services.core.inference.runtime import Classifier, get_classifier
from services.core.inference.saliency import occlusion_saliency, patch_positions
from services.lab.phantom import PhantomConfig, PhantomStudy, generate_study

F32 = npt.NDArray[np.float32]
SMALL = PhantomConfig(width=256, height=320)
PARAMS = Preprocessing.for_training_geometry(256, 320)
H, W = PARAMS.input_shape
# The hand-made occlusion model looks at this region of the input only (rows, cols).
REGION = (slice(10, 50), slice(40, 70))


class ProbabilityOnly(nn.Module):
    """A CNN3 without the Grad-CAM output: image -> malignancy."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return torch.sigmoid(self.model(image))


class RegionMean(nn.Module):
    """sigmoid(20 * (mean of REGION - 0.25)): only a bright spot inside REGION matters."""

    def forward(self, image: Tensor) -> Tensor:
        region = image[:, 0, REGION[0], REGION[1]]
        return torch.sigmoid(20.0 * (region.mean(dim=(1, 2)) - 0.25))


def _export(
    module: nn.Module, path: Path, outputs: list[str], *, external_data: bool = False
) -> None:
    x = torch.rand(2, 1, H, W)
    with warnings.catch_warnings():  # the exporter's deprecation notes about dynamic_axes
        warnings.simplefilter("ignore")
        _export_quietly(module, x, path, outputs, external_data)


def _export_quietly(
    module: nn.Module, x: Tensor, path: Path, outputs: list[str], external_data: bool
) -> None:
    torch.onnx.export(
        module.eval(),
        (x,),
        str(path),
        input_names=["image"],
        output_names=outputs,
        dynamic_axes={"image": {0: "N"}, **{name: {0: "N"} for name in outputs}},
        opset_version=18,
        dynamo=True,
        external_data=external_data,  # one file: the card's sha256 must cover the weights
        verbose=False,
    )


def _card(directory: Path, onnx: Path, outputs: dict[str, list[int | str]], saliency: str) -> Path:
    card = ModelCard(
        name=onnx.stem,
        version="0.0.1",
        file=onnx.name,
        sha256=file_sha256(onnx),
        architecture="cnn3",
        opset=18,
        input_shape=["N", 1, H, W],
        outputs=outputs,
        saliency=saliency,
        preprocessing=PARAMS.as_dict(),
    )
    path = directory / "card.json"
    write_card(card, path)
    return path


@pytest.fixture(scope="session")
def cnn3() -> CNN3:
    torch.manual_seed(3)  # a seed whose Grad-CAM is zero for some random inputs, not all
    model = CNN3(PARAMS.input_shape)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, cnn3: CNN3) -> dict[str, Path]:
    """Cards of four exported models: gradcam (CNN3), both (CNN3 with Grad-CAM and HiResCAM,
    the card choosing HiResCAM), occlusion (CNN3), region (hand-made)."""
    root = tmp_path_factory.mktemp("models")
    cards: dict[str, Path] = {}
    gradcam = root / "gradcam"
    gradcam.mkdir()
    _export(WithGradCam(cnn3, hirescam=False), gradcam / "cnn3.onnx", ["malignancy", "gradcam"])
    cam_shape = (
        ort.InferenceSession(str(gradcam / "cnn3.onnx"), providers=["CPUExecutionProvider"])
        .get_outputs()[1]
        .shape
    )
    cards["gradcam"] = _card(
        gradcam, gradcam / "cnn3.onnx", {"malignancy": ["N"], "gradcam": cam_shape}, "gradcam"
    )
    both = root / "both"
    both.mkdir()
    _export(WithGradCam(cnn3), both / "cnn3.onnx", ["malignancy", "gradcam", "hirescam"])
    cards["both"] = _card(
        both,
        both / "cnn3.onnx",
        {"malignancy": ["N"], "gradcam": cam_shape, "hirescam": cam_shape},
        "hirescam",
    )
    for name, module in (("occlusion", ProbabilityOnly(cnn3)), ("region", RegionMean())):
        directory = root / name
        directory.mkdir()
        _export(module, directory / f"{name}.onnx", ["malignancy"])
        cards[name] = _card(
            directory, directory / f"{name}.onnx", {"malignancy": ["N"]}, "occlusion"
        )
    return cards


@pytest.fixture
def copy_model(tmp_path: Path, models_dir: dict[str, Path]) -> Callable[[str], Path]:
    """A private copy of one model's directory (to damage); returns its card path."""

    def make(kind: str) -> Path:
        target = tmp_path / kind
        shutil.copytree(models_dir[kind].parent, target)
        return target / "card.json"

    return make


def _edit_card(card_path: Path, **changes: object) -> None:
    card = load_card(card_path)
    write_card(card.model_copy(update=changes), card_path)


def _inputs(n: int, seed: int = 0) -> F32:
    return np.random.default_rng(seed).random((n, 1, H, W), dtype=np.float32)


# ---------------------------------------------------------------------- loading and checks


def test_load_reports_provider_and_method(models_dir: dict[str, Path]) -> None:
    clf = Classifier.load(models_dir["gradcam"])
    assert clf.provider in ort.get_available_providers()
    assert (
        clf.provider
        == ort.InferenceSession(
            str(clf.model_path),
            providers=[
                p
                for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                if p in ort.get_available_providers()
            ],
        ).get_providers()[0]
    )
    assert clf.saliency_method == "gradcam"
    assert clf.input_shape == (H, W)
    assert Classifier.load(models_dir["occlusion"]).saliency_method == "occlusion"
    cpu = Classifier.load(models_dir["gradcam"], providers=["CPUExecutionProvider"])
    assert cpu.provider == "CPUExecutionProvider"


def test_sha256_mismatch(copy_model: Callable[[str], Path]) -> None:
    card_path = copy_model("gradcam")
    onnx = card_path.parent / "cnn3.onnx"
    expected = load_card(card_path).sha256
    with onnx.open("ab") as fh:
        fh.write(b"\0")
    actual = file_sha256(onnx)
    with pytest.raises(InvalidInput) as info:
        Classifier.load(card_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(onnx) in message and expected in message and actual in message
    assert "sha256" in message and "re-export" in message


def test_missing_onnx_file(copy_model: Callable[[str], Path]) -> None:
    card_path = copy_model("gradcam")
    (card_path.parent / "cnn3.onnx").unlink()
    with pytest.raises(NotFound, match=r"ONNX model .*cnn3\.onnx named by model card .* not found"):
        Classifier.load(card_path)


def test_missing_card(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"model card .*nothing\.json not found"):
        Classifier.load(tmp_path / "nothing.json")


def test_card_outputs_must_match_graph(copy_model: Callable[[str], Path]) -> None:
    card_path = copy_model("gradcam")
    _edit_card(card_path, outputs={"malignancy": ["N"]}, saliency="occlusion")
    with pytest.raises(InvalidInput, match=r"graph's outputs are \['gradcam', 'malignancy'\] but"):
        Classifier.load(card_path)
    _edit_card(card_path, outputs={"malignancy": ["N"], "gradcam": ["N", 9, 9]})
    with pytest.raises(InvalidInput, match=r"output 'gradcam' has shape \[N, \d+, \d+\] but"):
        Classifier.load(card_path)


def test_card_saliency_gradcam_needs_the_output(copy_model: Callable[[str], Path]) -> None:
    card_path = copy_model("occlusion")
    _edit_card(card_path, saliency="gradcam")
    with pytest.raises(InvalidInput, match="saliency is 'gradcam' but the graph has no"):
        Classifier.load(card_path)


def test_wrong_input_name(copy_model: Callable[[str], Path]) -> None:
    card_path = copy_model("gradcam")
    _edit_card(card_path, input_name="pixels")
    with pytest.raises(InvalidInput, match=r"input is named 'image' but the card says 'pixels'"):
        Classifier.load(card_path)


def test_gradcam_grid_must_fit_the_input(copy_model: Callable[[str], Path]) -> None:
    card_path = copy_model("gradcam")
    _edit_card(card_path, gradcam_grid=GradCamGrid(stride=(32, 32), offset=(15.5, 15.5)))
    assert Classifier.load(card_path).saliency_grid == SaliencyGrid((32, 32), (15.5, 15.5))
    _edit_card(card_path, gradcam_grid=GradCamGrid(stride=(32, 64), offset=(15.5, 15.5)))
    with pytest.raises(InvalidInput, match=r"gradcam_grid .* outside the input's"):
        Classifier.load(card_path)


def test_input_shape_must_match_preprocessing(copy_model: Callable[[str], Path]) -> None:
    card_path = copy_model("gradcam")
    other = Preprocessing.for_training_geometry(512, 640)
    _edit_card(card_path, preprocessing=other.as_dict())
    with pytest.raises(InvalidInput, match="card's preprocessing makes"):
        Classifier.load(card_path)
    _edit_card(card_path, preprocessing=PARAMS.as_dict(), input_shape=["N", 1, H + 1, W])
    with pytest.raises(InvalidInput, match="does not match the card's input_shape"):
        Classifier.load(card_path)


def test_not_an_onnx_file(copy_model: Callable[[str], Path]) -> None:
    card_path = copy_model("gradcam")
    onnx = card_path.parent / "cnn3.onnx"
    onnx.write_bytes(b"not a model")
    _edit_card(card_path, sha256=file_sha256(onnx))
    with pytest.raises(InvalidInput, match="cannot be opened by onnxruntime"):
        Classifier.load(card_path)


def test_external_data_refused(tmp_path: Path, cnn3: CNN3, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights in a separate .data file are not covered by the card's sha256: refused, even
    when the data file lies beside the model or in the working directory."""
    onnx = tmp_path / "split.onnx"
    _export(ProbabilityOnly(cnn3), onnx, ["malignancy"], external_data=True)
    assert (tmp_path / "split.onnx.data").stat().st_size > 0
    card_path = _card(tmp_path, onnx, {"malignancy": ["N"]}, "occlusion")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInput, match=r"separate file \(ONNX external data\).*external_data"):
        Classifier.load(card_path)


def test_unknown_provider(models_dir: dict[str, Path]) -> None:
    with pytest.raises(InvalidParameter, match="NoSuchExecutionProvider not available"):
        Classifier.load(models_dir["gradcam"], providers=["NoSuchExecutionProvider"])


def test_get_classifier_caches_per_card_and_hash(copy_model: Callable[[str], Path]) -> None:
    card_path = copy_model("gradcam")
    runtime.clear_cache()
    first = get_classifier(card_path)
    assert get_classifier(card_path) is first
    # A new model behind the same card path (new file, new hash) is loaded afresh.
    occlusion_card = copy_model("occlusion")
    shutil.copy(occlusion_card.parent / "occlusion.onnx", card_path.parent / "cnn3.onnx")
    card = load_card(occlusion_card).model_copy(update={"file": "cnn3.onnx"})
    write_card(card, card_path)
    second = get_classifier(card_path)
    assert second is not first and second.saliency_method == "occlusion"
    runtime.clear_cache()


# ---------------------------------------------------------------------- prediction


@pytest.mark.parametrize("n", [1, 3, 11])
def test_predict_batches_like_one_run(models_dir: dict[str, Path], cnn3: CNN3, n: int) -> None:
    clf = Classifier.load(models_dir["gradcam"])
    x = _inputs(n, seed=n)
    probs, cams = clf.predict(x, batch_size=4)
    session = ort.InferenceSession(str(clf.model_path), providers=["CPUExecutionProvider"])
    ref_probs, ref_cams = session.run(["malignancy", "gradcam"], {"image": x})
    assert probs.shape == (n,) and probs.dtype == np.float32
    assert np.all((probs >= 0) & (probs <= 1))
    np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
    assert cams is not None
    assert cams.shape == (n, *clf.saliency_shape)
    # The exported graph gives NaN (0/0) where the map is all zero; predict gives 0 there.
    np.testing.assert_allclose(cams, np.nan_to_num(ref_cams, nan=0.0), atol=1e-5)
    peaks = cams.max(axis=(1, 2))
    assert np.all(np.isclose(peaks, 0.0) | np.isclose(peaks, 1.0)) and cams.min() >= 0
    default_probs, _ = clf.predict(x)  # batch size 8
    np.testing.assert_allclose(default_probs, probs, atol=1e-5)
    with torch.no_grad():
        torch_probs, torch_cams = WithGradCam(cnn3, hirescam=False)(torch.from_numpy(x))
    np.testing.assert_allclose(probs, torch_probs.numpy(), atol=1e-4)
    # atol 1e-3: the exporter drops the "+ 1e-8" of cam / (peak + 1e-8), which matters for
    # maps whose peak is itself tiny.
    np.testing.assert_allclose(cams, torch_cams.numpy(), atol=1e-3)


def test_the_card_chooses_the_saliency_map(
    models_dir: dict[str, Path], copy_model: Callable[[str], Path], cnn3: CNN3
) -> None:
    """A graph with both maps: the card's saliency picks the one predict returns."""
    x = _inputs(4, seed=5)
    with torch.no_grad():
        _, gradcam, hirescam = WithGradCam(cnn3)(torch.from_numpy(x))
    assert not np.allclose(gradcam.numpy(), hirescam.numpy(), atol=1e-3)
    clf = Classifier.load(models_dir["both"])
    assert clf.saliency_method == "hirescam"
    _, cams = clf.predict(x)
    np.testing.assert_allclose(cams, hirescam.numpy(), atol=1e-3)  # type: ignore[arg-type]
    card_path = copy_model("both")
    _edit_card(card_path, saliency="gradcam")
    clf = Classifier.load(card_path)
    assert clf.saliency_method == "gradcam"
    _, cams = clf.predict(x)
    np.testing.assert_allclose(cams, gradcam.numpy(), atol=1e-3)  # type: ignore[arg-type]
    _edit_card(card_path, saliency="occlusion")
    assert Classifier.load(card_path).saliency_method == "occlusion"


def test_card_saliency_must_be_known_and_in_the_graph(copy_model: Callable[[str], Path]) -> None:
    card_path = copy_model("gradcam")
    _edit_card(card_path, saliency="hirescam")
    with pytest.raises(
        InvalidInput,
        match="saliency is 'hirescam' but the graph has no 'hirescam' output: set saliency to "
        "one of 'gradcam', 'occlusion'",
    ):
        Classifier.load(card_path)
    _edit_card(card_path, saliency="lime")
    with pytest.raises(InvalidInput, match="use 'gradcam', 'hirescam', 'occlusion'"):
        Classifier.load(card_path)


def test_predict_refuses_wrong_shape(models_dir: dict[str, Path]) -> None:
    clf = Classifier.load(models_dir["gradcam"])
    with pytest.raises(
        InvalidInput, match=rf"takes inputs \[N, 1, {H}, {W}\], got \[2, 1, 10, 10\]"
    ):
        clf.predict(np.zeros((2, 1, 10, 10), dtype=np.float32))
    with pytest.raises(InvalidParameter, match="batch size"):
        clf.predict(_inputs(1), batch_size=0)
    probs, cams = clf.predict(_inputs(2), saliency=False)
    assert probs.shape == (2,) and cams is None


def test_occlusion_model(models_dir: dict[str, Path]) -> None:
    clf = Classifier.load(models_dir["occlusion"])
    assert clf.saliency_method == "occlusion"
    probs, maps = clf.predict(_inputs(3))
    assert probs.shape == (3,)
    assert maps is not None and maps.shape == (3, H, W)
    assert maps.min() >= 0 and maps.max() <= 1


def test_occlusion_peak_at_the_bright_square(models_dir: dict[str, Path]) -> None:
    clf = Classifier.load(models_dir["region"])
    image = np.full((1, 1, H, W), 0.2, dtype=np.float32)
    top, left, side = 20, 52, 8  # inside REGION, off its centre
    image[0, 0, top : top + side, left : left + side] = 1.0
    _, maps = clf.predict(image)
    assert maps is not None
    heat = maps[0]
    assert heat.max() == pytest.approx(1.0)
    peak_y, peak_x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    centre = (top + side / 2, left + side / 2)
    patch = round(H / 8)
    assert abs(peak_y - centre[0]) <= patch and abs(peak_x - centre[1]) <= patch
    # Far from the square (and outside the region the model reads) nothing matters.
    assert heat[55:, :].max() == 0.0
    assert heat[:, :35].max() == 0.0
    # Moving the square moves the peak.
    moved = np.full_like(image, 0.2)
    moved[0, 0, 38:46, 42:50] = 1.0
    _, maps2 = clf.predict(moved)
    assert maps2 is not None
    y2, x2 = np.unravel_index(int(np.argmax(maps2[0])), maps2[0].shape)
    assert abs(y2 - 42) <= patch and abs(x2 - 46) <= patch


def test_occlusion_saliency_plain_function() -> None:
    def forward(x: F32) -> F32:  # probability = mean of the top-left quarter
        out: F32 = x[:, 0, :8, :8].mean(axis=(1, 2))
        return out

    images = np.zeros((2, 1, 16, 16), dtype=np.float32)
    images[0, 0, 2:5, 2:5] = 1.0
    maps = occlusion_saliency(forward, images, fill=0.0, batch_size=5)
    assert maps.shape == (2, 16, 16)
    assert maps[0].max() == 1.0 and maps[0, 8:, :].max() == 0.0 and maps[0, :, 8:].max() == 0.0
    assert maps[1].max() == 0.0  # nothing to hide: all zero, not NaN
    assert patch_positions(16, 2, 1)[-1] == 14
    assert patch_positions(10, 4, 3) == [0, 3, 6]
    assert patch_positions(3, 5, 2) == [0]


# ---------------------------------------------------------------------- breasts


@pytest.fixture(scope="module")
def study() -> PhantomStudy:
    return generate_study(0, seed=5, config=SMALL)


def _named(study: PhantomStudy, *skip: str) -> list[tuple[str, Dataset]]:
    return [(f"{name}.dcm", ds) for name, ds in study.datasets.items() if name not in skip]


def test_group_breasts_phantom(study: PhantomStudy) -> None:
    breasts = group_breasts(_named(study))
    assert [(b.study_uid, b.laterality) for b in breasts] == [
        (study.study_uid, "L"),
        (study.study_uid, "R"),
    ]
    for breast in breasts:
        assert set(breast.views) == {"CC", "MLO"}
        assert breast.fallback is None
        for view, image in breast.views.items():
            ds = study.datasets[breast.laterality + view]
            assert image.sop_instance_uid == ds.SOPInstanceUID
            assert image.pixels.shape == (320, 256) == (image.rows, image.cols)
            assert image.bits_stored == 12 and image.photometric == "MONOCHROME2"
            assert image.source == f"{breast.laterality}{view}.dcm"
            assert image.window == window_of(ds) and image.window is not None


def test_group_breasts_refuses_ct() -> None:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ct = pydicom.dcmread(path)
    with pytest.raises(
        InvalidInput, match=r"CT_small\.dcm: is modality CT, not MG: the classifier"
    ):
        group_breasts([("CT_small.dcm", ct)])


def test_group_breasts_one_view_fallback(study: PhantomStudy) -> None:
    breasts = group_breasts(_named(study, "RMLO"))
    left, right = breasts
    assert left.fallback is None
    assert set(right.views) == {"CC"}
    assert right.fallback is not None and right.fallback.startswith("MLO view missing: CC view")
    cc, mlo = right.input_views()
    assert cc is mlo is right.views["CC"]
    only_mlo = group_breasts(_named(study, "LCC", "RCC", "RMLO"))
    assert only_mlo[0].fallback is not None and only_mlo[0].fallback.startswith("CC view missing")


def test_group_breasts_refuses_duplicates(study: PhantomStudy) -> None:
    items = [*_named(study), ("copy-of-LCC.dcm", study.datasets["LCC"])]
    with pytest.raises(InvalidInput, match=r"LCC\.dcm and copy-of-LCC\.dcm are both the L CC view"):
        group_breasts(items)


def test_group_breasts_needs_laterality(study: PhantomStudy) -> None:
    ds = copy.deepcopy(study.datasets["LCC"])
    del ds.ImageLaterality
    with pytest.raises(InvalidInput, match=r"nolat\.dcm: no breast laterality"):
        group_breasts([("nolat.dcm", ds)])
    ds.Laterality = "L"  # the series-level attribute is used when the image-level one is absent
    assert group_breasts([("lat.dcm", ds)])[0].laterality == "L"


def test_group_breasts_views(study: PhantomStudy) -> None:
    ds = copy.deepcopy(study.datasets["LMLO"])
    ds.ViewPosition = "ML"
    with pytest.raises(InvalidInput, match=r"ml\.dcm: view position 'ML' is not CC or MLO"):
        group_breasts([("ml.dcm", ds)])
    del ds.ViewPosition  # the view code sequence (MLO) is used instead
    assert set(group_breasts([("code.dcm", ds)])[0].views) == {"MLO"}


def test_group_breasts_refuses_multiframe_and_colour(study: PhantomStudy) -> None:
    two = copy.deepcopy(study.datasets["LCC"])
    two.NumberOfFrames = 2
    two.PixelData = two.PixelData * 2
    with pytest.raises(InvalidInput, match=r"two\.dcm: 2 frames; the classifier reads single"):
        group_breasts([("two.dcm", two)])
    path = get_testdata_file("SC_rgb_small_odd.dcm")
    assert path is not None
    rgb = pydicom.dcmread(path)
    rgb.Modality, rgb.ImageLaterality, rgb.ViewPosition = "MG", "L", "CC"
    rgb.StudyInstanceUID = "1.2.3"
    with pytest.raises(InvalidInput, match=r"rgb\.dcm: photometric interpretation RGB.*greyscale"):
        group_breasts([("rgb.dcm", rgb)])


def test_classify_breasts(models_dir: dict[str, Path], study: PhantomStudy) -> None:
    clf = Classifier.load(models_dir["gradcam"])
    breasts = group_breasts(_named(study))
    inputs = breast_inputs(clf, breasts)
    left = breasts[0]
    cc, mlo = (
        prepare_view(left.views[v].pixels, v, "L", PARAMS, bits_stored=12) for v in ("CC", "MLO")
    )
    expected = breast_input(cc, mlo, PARAMS)
    np.testing.assert_array_equal(inputs[0], expected)
    probs, _ = clf.predict(inputs)
    results = classify_breasts(clf, breasts, batch_size=1)
    assert [(r.study_uid, r.laterality) for r in results] == [
        (b.study_uid, b.laterality) for b in breasts
    ]
    for result, prob, breast in zip(results, probs, breasts, strict=True):
        assert result.probability == pytest.approx(float(prob), abs=1e-6)
        assert result.saliency_method == "gradcam" and result.fallback is None
        assert result.threshold == 0.5
        assert set(result.views) == {"CC", "MLO"}
        for view, sal in result.views.items():
            assert sal.sop_instance_uid == breast.views[view].sop_instance_uid
            assert sal.saliency.shape == (320, 256) and sal.saliency.dtype == np.float32
            assert sal.saliency.min() >= 0 and sal.saliency.max() <= 1


@pytest.mark.parametrize("model", ["gradcam", "occlusion"])
def test_classify_breasts_without_saliency(
    models_dir: dict[str, Path], study: PhantomStudy, model: str
) -> None:
    """Probabilities only (the job's run on the originals): the same numbers, no maps."""
    clf = Classifier.load(models_dir[model])
    breasts = group_breasts(_named(study))
    with_maps = classify_breasts(clf, breasts)
    without = classify_breasts(clf, breasts, saliency=False)
    assert [r.probability for r in without] == [r.probability for r in with_maps]
    assert all(r.views == {} for r in without)
    assert all(r.views for r in with_maps)


def test_classify_breasts_fallback_occlusion(
    models_dir: dict[str, Path], study: PhantomStudy
) -> None:
    clf = Classifier.load(models_dir["occlusion"])
    results = classify_breasts(clf, group_breasts(_named(study, "LMLO")))
    left = results[0]
    assert left.saliency_method == "occlusion"
    assert left.fallback is not None and set(left.views) == {"CC"}
    assert left.views["CC"].saliency.shape == (320, 256)
    assert 0.0 <= left.probability <= 1.0


# ---------------------------------------------------------------------- map-back geometry


def _to_input(params: Preprocessing, x: float, y: float, view: str, lat: str) -> tuple[int, int]:
    """Where original pixel (x, y) of a 256 x 320 view lies in the breast input (row, col)."""
    gx = (x + 0.5) * params.view_cols / 256 - 0.5
    gy = (y + 0.5) * params.view_rows / 320 - 0.5
    top, _, left, _ = params.crop_box(view, lat)
    cx, cy = gx - left, gy - top
    if lat == "R" and params.mirror_right:
        cx = params.crop_cols - 1 - cx
    cx += params.view_origin(view)
    return round(cy), round(cx)


ALIGNED = Preprocessing.for_training_geometry(256, 320, align=32, view_gap=64)


def test_breast_input_pads_each_view_and_leaves_a_gap() -> None:
    assert (ALIGNED.crop_rows, ALIGNED.crop_cols) == (77, 38)
    assert ALIGNED.input_shape == (96, 2 * 64 + 64)
    cc = np.full((77, 38), 0.25, dtype=np.float32)
    mlo = np.full((77, 38), 0.75, dtype=np.float32)
    x = breast_input(cc, mlo, ALIGNED)
    assert x.shape == (1, 96, 192)
    assert (x[0, :77, :38] == 0.25).all() and (x[0, :77, 128:166] == 0.75).all()
    assert x[0, 77:].max() == 0 and x[0, :, 38:128].max() == 0 and x[0, :, 166:].max() == 0
    with pytest.raises(InvalidInput, match="expected"):
        breast_input(cc[:, :30], mlo, ALIGNED)


@pytest.mark.parametrize("params", [PARAMS, ALIGNED], ids=["study", "aligned-gap"])
def test_map_back_puts_the_peak_on_the_lesion(params: Preprocessing) -> None:
    rows = [
        row
        for i in range(3)
        for row in generate_study(i, seed=11, config=SMALL).truth
        if row.center_x is not None
    ]
    kinds = {(row.laterality, row.view) for row in rows}
    assert kinds == {("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")}
    height, width = params.input_shape
    for row in rows:
        assert row.center_x is not None and row.center_y is not None
        assert row.radius_px is not None
        cy, cx = _to_input(params, row.center_x, row.center_y, row.view, row.laterality)
        assert 0 <= cy < height and 0 <= cx < width
        cam = np.zeros((height, width), dtype=np.float32)
        cam[cy, cx] = 1.0
        back = map_back(cam, row.view, row.laterality, params, 320, 256)
        assert back.shape == (320, 256)
        py, px = np.unravel_index(int(np.argmax(back)), back.shape)
        distance = float(np.hypot(px - row.center_x, py - row.center_y))
        assert distance <= row.radius_px, (row, (px, py), distance)
        # The other half of the input does not leak into this view.
        other = "CC" if row.view == "MLO" else "MLO"
        assert map_back(cam, other, row.laterality, params, 320, 256).max() < 1e-6


def test_map_back_puts_a_coarse_cell_where_its_grid_says() -> None:
    """A one-hot coarse map goes to its receptive-field centre, not to where an even stretch
    would put it: with ResNet18's grid (stride 32, offset 0) cell 1 is centred on input
    pixel 32, half a cell before the stretched map's 47.5."""
    cells = np.zeros((3, 6), dtype=np.float32)
    cells[1, 1] = 1.0
    grid = SaliencyGrid((32.0, 32.0), (0.0, 0.0))
    full = to_input_grid(cells, ALIGNED, grid)
    assert full.shape == ALIGNED.input_shape
    peak = np.unravel_index(int(np.argmax(full)), full.shape)
    assert (int(peak[0]), int(peak[1])) == (32, 32)
    stretched = to_input_grid(cells, ALIGNED)
    ties = np.argwhere(stretched == stretched.max())
    assert ties[:, 0].min() == 47 and ties[:, 0].max() == 48


def test_breast_without_views_is_refused() -> None:
    with pytest.raises(InvalidInput, match="has no views"):
        Breast("1.2.3", "L").input_views()
