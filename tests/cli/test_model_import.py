"""``crgate model import|list|show|remove`` on small ONNX graphs built here with onnx.helper.

Each test gets its own models folder (CRGATE_MODELS_DIR) holding a copy of the shipped default
model, so that nothing is installed into the repository's models/.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner, Result

from services.cli import app
from services.core.config import get_settings
from services.core.inference.card import file_sha256, load_card
from services.core.inference.runtime import Classifier

MODELS = Path(__file__).resolve().parents[2] / "models"
DEFAULT = "cnn3-phantom-v2"
runner = CliRunner()


def invoke(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def one_error(result: Result, code: int, pattern: str) -> str:
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


@pytest.fixture
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "models"
    folder.mkdir()
    for suffix in (".json", ".onnx"):
        shutil.copyfile(MODELS / f"{DEFAULT}{suffix}", folder / f"{DEFAULT}{suffix}")
    monkeypatch.setenv("CRGATE_MODELS_DIR", str(folder))
    get_settings.cache_clear()
    yield folder
    get_settings.cache_clear()


# ---------------------------------------------------------------------- graphs


def _value(name: str, kind: int, shape: list[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, kind, shape)


def build(
    path: Path,
    *,
    input_shape: list[int | str | None] | None = None,
    input_type: int = TensorProto.FLOAT,
    extra_output: str | None = None,
    cam: bool = False,
    poison: bool = False,
    scale: float = 20.0,
) -> Path:
    """A brightness "classifier": sigmoid(scale * (mean(x) - 0.3)) per input, [N].

    ``extra_output`` adds a second [N] float output (a logit, shifted by 10); ``cam`` a
    [N, 2, 3] hirescam output (block means of a 64x96 input); ``poison`` multiplies the
    probability by NaN.
    """
    shape = input_shape or ["N", 1, 64, 96]
    nodes = []
    x = "x"
    if input_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
        x = "xf"
    axes = list(range(1, len(shape)))
    nodes += [
        helper.make_node("ReduceMean", [x, "axes"], ["mean"], keepdims=0),
        helper.make_node("Sub", ["mean", "offset"], ["centred"]),
        helper.make_node("Mul", ["centred", "scale"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["sig"]),
        helper.make_node(
            "Mul" if poison else "Identity", ["sig", "nan"] if poison else ["sig"], ["prob"]
        ),
    ]
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes),
        helper.make_tensor("offset", TensorProto.FLOAT, [], [0.3]),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
        helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")]),
        helper.make_tensor("ten", TensorProto.FLOAT, [], [10.0]),
    ]
    batch = shape[0]
    outputs = [_value("prob", TensorProto.FLOAT, [batch])]
    if extra_output:
        nodes.append(helper.make_node("Add", ["logit", "ten"], [extra_output]))
        outputs.append(_value(extra_output, TensorProto.FLOAT, [batch]))
    if cam:
        nodes += [
            helper.make_node("Reshape", ["x", "blocks"], ["blocked"]),
            helper.make_node("ReduceMean", ["blocked", "block_axes"], ["hirescam"], keepdims=0),
        ]
        inits += [
            helper.make_tensor("blocks", TensorProto.INT64, [5], [-1, 2, 32, 3, 32]),
            helper.make_tensor("block_axes", TensorProto.INT64, [2], [2, 4]),
        ]
        outputs.append(_value("hirescam", TensorProto.FLOAT, [batch, 2, 3]))
    graph = helper.make_graph(
        nodes, "site", [_value("x", input_type, shape)], outputs, initializer=inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


# ---------------------------------------------------------------------- import


def test_import_list_show_classify_remove(models_dir: Path, tmp_path: Path) -> None:
    model = build(tmp_path / "site.onnx")
    result = invoke(
        "model", "import", model, "--name", "site", "--version", "v1", "--threshold", "0.4"
    )
    assert result.exit_code == 0, result.output
    assert "installed site-v1" in result.stdout and "crgate study --model site-v1" in result.stdout
    card_path = models_dir / "site-v1.json"
    card = load_card(card_path)
    assert card.sha256 == file_sha256(models_dir / "site-v1.onnx") == file_sha256(model)
    assert (card.input_name, card.input_shape) == ("x", ["N", 1, 64, 96])
    assert (card.probability_output, card.saliency) == ("prob", "occlusion")
    assert card.operating_threshold == 0.4 and card.opset == 18
    params = card.preprocess
    assert params.input_shape == (64, 96) and params.views == "cc+mlo"
    assert card.trained_geometry is not None and card.trained_geometry.cols == 320
    extra = json.loads(card_path.read_text())["imported"]
    assert extra["source"] == "site.onnx" and len(extra["test"]["probabilities"]) == 2
    assert all(0 <= p <= 1 for p in extra["test"]["probabilities"])
    # the service loads it as any model
    assert Classifier.load(card_path).saliency_method == "occlusion"

    listed = invoke("model", "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = {r["key"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == {DEFAULT, "site-v1"} and rows[DEFAULT]["default"] is True
    assert rows["site-v1"]["imported"]["source"] == "site.onnx"
    assert "site-v1" in invoke("model", "list").stdout

    shown = invoke("model", "show", "site-v1")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["probability_output"] == "prob"
    one_error(invoke("model", "show", "nosuch"), 6, r"no model 'nosuch'.*installed: cnn3")

    # the same name and version twice: refused
    again = invoke("model", "import", model, "--name", "site", "--version", "v1")
    one_error(again, 7, r"model site-v1 is already installed")

    one_error(invoke("model", "remove", DEFAULT), 2, r"is the default model")
    removed = invoke("model", "remove", "site-v1")
    assert removed.exit_code == 0, removed.output
    assert not card_path.exists() and not (models_dir / "site-v1.onnx").exists()
    one_error(invoke("model", "remove", "../models/x"), 2, r"no path")


def test_imported_model_classifies_phantoms(models_dir: Path, tmp_path: Path) -> None:
    build(tmp_path / "cam.onnx", cam=True)
    assert (
        invoke(
            "model", "import", tmp_path / "cam.onnx", "--name", "cam", "--version", "1"
        ).exit_code
        == 0
    )
    assert load_card(models_dir / "cam-1.json").saliency == "hirescam"
    data = tmp_path / "phantoms"
    assert invoke("synth", "--out-dir", data, "--size", "320x267").exit_code == 0
    result = invoke(
        "classify", data, "--model", "cam-1", "--cr", "10", "--json", "--overlays", tmp_path / "o"
    )
    assert result.exit_code == 0, result.output
    breasts = [
        json.loads(line)["breast"] for line in result.stdout.splitlines() if '"breast"' in line
    ]
    assert len(breasts) == 2 and all(b["saliency_method"] == "hirescam" for b in breasts)
    assert len(list((tmp_path / "o").glob("*.preview.png"))) == 4


@pytest.mark.parametrize(
    ("kwargs", "options", "pattern"),
    [
        ({"input_type": TensorProto.UINT8}, [], r"no float input: input 'x' is tensor\(uint8\)"),
        (
            {"input_shape": ["N", 64, 96]},
            [],
            r"rank 3 shape \[N, 64, 96\]; crgate feeds \[N, 1, H, W\]",
        ),
        ({"input_shape": [4, 1, 64, 96]}, [], r"fixed batch of 4"),
        (
            {"extra_output": "logits"},
            [],
            r"2 outputs could be the probability \(prob, logits\): name it with --output",
        ),
        ({"poison": True}, [], r"non-finite output nan from 'prob' on a phantom breast"),
        ({"scale": 2.0}, ["--output", "nosuch"], r"--output 'nosuch' is not an output"),
        (
            {"input_shape": ["N", 1, "H", "W"]},
            [],
            r"leaves its height or width open: give --input-size",
        ),
        ({}, ["--input-size", "32x32"], r"--input-size 32x32 differs from the graph's input"),
        ({}, ["--views", "both"], r"--views 'both': use cc\+mlo or single"),
    ],
)
def test_bad_models_get_one_line(
    models_dir: Path, tmp_path: Path, kwargs: dict[str, object], options: list[str], pattern: str
) -> None:
    model = build(tmp_path / "bad.onnx", **kwargs)  # type: ignore[arg-type]
    result = invoke("model", "import", model, "--name", "bad", "--version", "v1", *options)
    one_error(result, 2, pattern)
    assert not list(models_dir.glob("bad-*"))


def test_a_logit_output_is_refused(models_dir: Path, tmp_path: Path) -> None:
    model = build(tmp_path / "two.onnx", extra_output="logits")
    result = invoke(
        "model", "import", model, "--name", "two", "--version", "v1", "--output", "logits"
    )
    one_error(result, 2, r"out-of-range output .* from 'logits'.*needs a Sigmoid")
    ok = invoke("model", "import", model, "--name", "two", "--version", "v1", "--output", "prob")
    assert ok.exit_code == 0, ok.output
    card = load_card(models_dir / "two-v1.json")
    assert card.probability_output == "prob" and set(card.outputs) == {"prob", "logits"}


def test_open_size_fixed_batch_and_single_view(models_dir: Path, tmp_path: Path) -> None:
    open_size = build(tmp_path / "open.onnx", input_shape=["N", 1, "H", "W"])
    result = invoke(
        "model", "import", open_size, "--name", "open", "--version", "v1", "--input-size", "128x80"
    )
    assert result.exit_code == 0, result.output
    card = load_card(models_dir / "open-v1.json")
    assert card.input_shape == ["N", 1, 128, 80] and card.preprocess.input_shape == (128, 80)

    single = build(tmp_path / "single.onnx", input_shape=[1, 1, 64, 48])
    result = invoke(
        "model", "import", single, "--name", "single", "--version", "v1", "--views", "single"
    )
    assert result.exit_code == 0, result.output
    card_path = models_dir / "single-v1.json"
    card = load_card(card_path)
    assert card.preprocess.views == "single" and card.input_shape == [1, 1, 64, 48]
    assert card.preprocess.input_shape == (64, 96)  # the breast input: both views side by side
    clf = Classifier.load(card_path)
    # a breast's probability is the mean of its two views' (the graph takes one at a time)
    x = np.zeros((3, 1, 64, 96), dtype=np.float32)
    x[:, :, :, :48] = 0.3  # the CC half at the graph's offset: p = 0.5
    x[1, :, :, 48:] = 0.5  # the MLO half brighter in the second breast
    probs, maps = clf.predict(x, batch_size=2)
    mlo = 1 / (1 + np.exp(-20 * (0.5 - 0.3)))
    assert probs == pytest.approx(
        [0.5 * (0.5 + 1 / (1 + np.exp(6))), 0.5 * (0.5 + mlo), probs[0]], abs=1e-5
    )
    assert maps is not None and maps.shape == (3, 64, 96) and clf.saliency_method == "occlusion"
