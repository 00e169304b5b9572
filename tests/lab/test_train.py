"""`crgate train` end to end on a few small phantoms: model + card, cache reuse, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.core.inference.card import file_sha256, load_card
from services.core.inference.runtime import Classifier


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("phantoms")
    result = CliRunner().invoke(
        app, ["synth", "--out-dir", str(data), "--studies", "20", "--size", "256x320"]
    )
    assert result.exit_code == 0, result.output
    return data


def run_train(phantoms: Path, out: Path, cache: Path, *extra: str) -> CliRunner:
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train", "--data-dir", str(phantoms), "--out-dir", str(out), "--cache-dir", str(cache),
            "--crs", "1,25", "--test-crs", "1,50", "--epochs", "2", "--bootstrap", "50",
            "--workers", "2", *extra,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output + str(result.exception)
    return runner


def test_train_writes_a_model_the_runtime_accepts(phantoms: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run_train(phantoms, tmp_path / "m", cache)
    card = load_card(tmp_path / "m" / "cnn3-phantom-v1.json")
    assert card.sha256 == file_sha256(tmp_path / "m" / card.file)
    assert [r.cr for r in card.test_results] == [1.0, 50.0]
    assert card.training["crs"] == [1.0, 25.0]
    assert card.training["phantom"]["config"]["width"] == 256
    assert card.training["split"] == "7:1:2 by patient"
    for r in card.test_results:
        assert r.auroc.ci_low <= r.auroc.value <= r.auroc.ci_high
    classifier = Classifier.load(tmp_path / "m" / "cnn3-phantom-v1.json")
    assert classifier.saliency_method == "hirescam"

    # a second run finds every compressed copy in the cache and rewrites none of them
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npz")}
    assert any("-cr25.npz" in p.name for p in stamps) and any("-cr50.npz" in p.name for p in stamps)
    run_train(phantoms, tmp_path / "m2", cache)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.npz")} == stamps


def test_cross_validation_reports_every_fold(phantoms: Path, tmp_path: Path) -> None:
    run_train(phantoms, tmp_path / "cv", tmp_path / "cache", "--folds", "3")
    report = json.loads((tmp_path / "cv" / "cnn3-phantom-v1-cv3.json").read_text())
    assert report["folds"] == 3
    for row in report["per_cr"]:
        assert len(row["auroc"]["folds"]) == 3


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--crs", "0,25"], "compression ratio"),
        (["--crs", "-5"], "compression ratio"),
        (["--test-crs", ""], "empty"),
        (["--arch", "vgg"], "unknown architecture"),
    ],
)
def test_bad_arguments(phantoms: Path, tmp_path: Path, args: list[str], words: str) -> None:
    result = CliRunner().invoke(
        app, ["train", "--data-dir", str(phantoms), "--out-dir", str(tmp_path), *args]
    )
    assert result.exit_code != 0
    assert words in result.stderr


def test_folder_without_truth_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--data-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "truth.csv" in result.stderr and "crgate synth" in result.stderr
