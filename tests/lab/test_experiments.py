"""`crgate experiment` end to end on a few small phantoms: the three experiments share their
models, an interrupted run resumes, bad input gets one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from services.cli import app
from services.core.errors import InvalidParameter
from services.lab.training.experiments import ModelSpec, plan
from tests.processes import in_own_session, kill_and_collect_survivors

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("phantoms")
    result = CliRunner().invoke(
        app, ["synth", "--out-dir", str(data), "--studies", "20", "--size", "256x320"]
    )
    assert result.exit_code == 0, result.output
    return data


def args(name: str, phantoms: Path, out: Path, *extra: str) -> list[str]:
    return [
        "experiment", name, "--data-dir", str(phantoms), "--out", str(out),
        "--cache-dir", str(out / "cache"), "--crs", "1,25,50", "--steps", "4",
        "--bootstrap", "20", "--workers", "2", *extra,
    ]  # fmt: skip


def run(name: str, phantoms: Path, out: Path, *extra: str) -> dict:  # type: ignore[type-arg]
    result = CliRunner().invoke(app, args(name, phantoms, out, *extra))
    assert result.exit_code == 0, result.output + str(result.exception)
    assert "report:" in result.output
    return json.loads((out / name / "results.json").read_text())  # type: ignore[no-any-return]


def test_plan_names_and_ranges() -> None:
    crs = [1, 15, 1000, 11000]
    assert [p.spec.label for p in plan("same-cr", ["cnn3"], crs)] == [
        "M-CR1", "M-CR15", "M-CR1K", "M-CR11K"
    ]  # fmt: skip
    same = plan("same-cr", ["cnn3"], crs)
    assert all(p.test_crs == p.spec.train_crs for p in same)
    matrix = plan("matrix", ["cnn3", "resnet18"], crs)
    assert len(matrix) == 8 and all(p.test_crs == (1, 15, 1000, 11000) for p in matrix)
    augmentation = plan("augmentation", ["cnn3"], crs)
    assert [p.spec for p in augmentation] == [
        ModelSpec("cnn3", (1.0,)),
        ModelSpec("cnn3", (1.0, 15.0)),
        ModelSpec("cnn3", (1.0, 15.0, 1000.0)),
        ModelSpec("cnn3", (1.0, 15.0, 1000.0, 11000.0)),
    ]
    assert augmentation[-1].spec.label == "M-CR1to11K"
    with pytest.raises(InvalidParameter, match="needs CR 1"):
        plan("augmentation", ["cnn3"], [15, 25])


def test_the_three_experiments_share_their_models(phantoms: Path, tmp_path: Path) -> None:
    same = run("same-cr", phantoms, tmp_path)
    assert same["run"]["models_trained"] == 3
    assert [m["label"] for m in same["models"]] == ["M-CR1", "M-CR25", "M-CR50"]
    for m in same["models"]:  # trained and tested on one CR
        assert [r["cr"] for r in m["results"]] == m["train_crs"]
        assert m["epochs"] >= 1 and m["training_inputs"] == same["split"]["train"]
    table = (tmp_path / "same-cr" / "table1.csv").read_text().splitlines()
    assert table[0].startswith("arch,model,cr,auroc") and len(table) == 4
    assert (tmp_path / "same-cr" / "auroc_vs_cr.png").read_bytes().startswith(PNG)
    # Fig. 3: the original and M-CR1 (the only panel CR of this run) on one malignant case
    assert same["saliency_panel"] == "saliency.png"
    panel = Image.open(tmp_path / "same-cr" / "saliency.png")
    assert panel.format == "PNG"
    tile = (panel.width - 8) // 2  # two tiles of one width, 8 black columns between them
    pixels = np.asarray(panel.convert("RGB"))
    assert panel.width == 2 * tile + 8 and not pixels[:, tile : tile + 8].any()
    assert pixels[:, :tile].any() and pixels[:, tile + 8 :].any()
    assert 'src="saliency.png"' in (tmp_path / "same-cr" / "report.html").read_text()

    # the matrix reuses those three models and only adds the test CRs they lack
    matrix = run("matrix", phantoms, tmp_path)
    assert matrix["run"] == {**matrix["run"], "models_trained": 0, "models_reused": 3}
    assert matrix["run"]["tests_run"] == 6
    diagonal = {m["label"]: m["results"][0]["auroc"] for m in same["models"]}
    for m in matrix["models"]:
        assert [r["cr"] for r in m["results"]] == [1, 25, 50]
        own = next(r for r in m["results"] if r["cr"] == m["train_crs"][0])
        assert own["auroc"] == diagonal[m["label"]]
    rows = (tmp_path / "matrix" / "matrix_auroc.csv").read_text().splitlines()
    assert rows[0] == "arch,model,test_cr_1,test_cr_25,test_cr_50" and len(rows) == 4
    assert (tmp_path / "matrix" / "matrix_auroc.png").read_bytes().startswith(PNG)
    assert "M-CR25" in (tmp_path / "matrix" / "report.html").read_text()

    # augmentation: M-CR1 again, and the ranges 1-25 and 1-50 (original + one copy per breast)
    aug = run("augmentation", phantoms, tmp_path)
    assert aug["run"]["models_trained"] == 2 and aug["run"]["models_reused"] == 1
    assert [m["train_crs"] for m in aug["models"]] == [[1], [1, 25], [1, 25, 50]]
    assert aug["models"][2]["training_inputs"] == 2 * same["split"]["train"]
    assert (tmp_path / "augmentation" / "augmentation.png").read_bytes().startswith(PNG)

    again = run("augmentation", phantoms, tmp_path)
    assert again["run"]["models_trained"] == 0 and again["run"]["tests_run"] == 0
    assert again["models"] == aug["models"]


def test_an_interrupted_run_resumes(phantoms: Path, tmp_path: Path) -> None:
    """SIGKILL once the first model is saved: nothing of the run is left within a few seconds
    (its compression workers included); the rerun trains only the other two."""
    crgate = Path(sys.executable).parent / "crgate"
    command = [str(crgate), *args("same-cr", phantoms, tmp_path)]
    command[command.index("--steps") + 1] = "60"
    models = tmp_path / "models"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    with in_own_session(command, **quiet) as process:
        deadline = time.monotonic() + 300
        while not list(models.glob("*.json")) and time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.02)
        assert kill_and_collect_survivors(process) == {}
    saved = {p.name for p in models.glob("*.json")}
    assert 1 <= len(saved) < 3
    assert not [p for p in models.iterdir() if p.name.startswith(".")]  # no partial file

    result = CliRunner().invoke(app, [*command[1:]])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "same-cr" / "results.json").read_text())
    assert report["run"]["models_reused"] == len(saved)
    assert report["run"]["models_trained"] == 3 - len(saved)


@pytest.mark.parametrize(
    ("name", "extra", "words"),
    [
        ("bogus", [], "unknown experiment 'bogus'"),
        ("matrix", ["--crs", "0,25"], "compression ratio"),
        ("matrix", ["--crs", "-5"], "compression ratio"),
        ("matrix", ["--arch", "vgg"], "unknown architecture"),
        ("augmentation", ["--crs", "25,50"], "needs CR 1"),
    ],
)
def test_bad_arguments(
    phantoms: Path, tmp_path: Path, name: str, extra: list[str], words: str
) -> None:
    result = CliRunner().invoke(app, [*args(name, phantoms, tmp_path), *extra])
    assert result.exit_code == 2
    assert words in result.output and result.output.startswith("error:")
    assert not (tmp_path / "models").exists()


def test_a_folder_without_phantoms_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, args("same-cr", tmp_path, tmp_path / "out"))
    assert result.exit_code != 0
    assert "truth.csv not found" in result.output
