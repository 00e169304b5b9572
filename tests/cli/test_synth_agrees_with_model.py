"""`crgate synth` with its default preset makes phantoms the shipped model reads as its card says.

The held-out check runs the two obvious commands, `crgate synth` (default preset, a seed that is
neither the training seed 2026 nor the held-out test's 9090) and `crgate classify --cr 25
--json`, which reports every breast's probability on the CR 25 copy and on the original (CR 1).
At the training geometry (832x1024, the card's ``trained_geometry``) it takes about a minute on
2 cores; a slow-marked check runs the generator's full default size (3328x4096) on 8 studies.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner, Result

from services.cli import app
from services.core import stats
from services.core.inference.card import load_card
from services.lab.phantom import PRESETS, PhantomConfig

MODELS = Path(__file__).resolve().parents[2] / "models"
CARDS = ("cnn3-phantom-v2", "resnet18-phantom-v1")
HELD_OUT_SEED = 4242  # training: 2026; tests/core/test_classifier_shipped.py: 9090
runner = CliRunner()


def invoke(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("name", CARDS)
def test_cards_were_trained_on_the_default_preset(name: str) -> None:
    card = load_card(MODELS / f"{name}.json")
    phantom = card.training["phantom"]
    assert phantom["preset"] == "default" and card.training["test_preset"].startswith("default")
    # the training configuration is exactly the default preset at the training size
    assert phantom["config"] == json.loads(
        json.dumps(asdict(PhantomConfig(width=832, height=1024)))
    )
    assert card.trained_geometry is not None
    assert (card.trained_geometry.cols, card.trained_geometry.rows) == (832, 1024)
    assert card.trained_geometry.pixel_spacing_mm == pytest.approx(
        PhantomConfig(width=832, height=1024).spacing_mm
    )


def test_card_records_auroc_per_cr_on_both_presets() -> None:
    extra = load_card(MODELS / "cnn3-phantom-v2.json").model_extra or {}
    checks = {(c["preset"], c["size"]): c for c in extra["phantom_checks"]}
    assert set(checks) == {
        ("default", "832x1024"),
        ("subtle", "832x1024"),
        ("default", "3328x4096"),
    }
    for check in checks.values():
        assert all(r["ci_low"] <= r["value"] <= r["ci_high"] for r in check["auroc"])
    for key in (("default", "832x1024"), ("subtle", "832x1024")):
        crs = [row["cr"] for row in checks[key]["auroc"]]
        assert crs == [1.0, 15.0, 25.0, 100.0, 1000.0, 5000.0, 11000.0]
    default = {r["cr"]: r for r in checks["default", "832x1024"]["auroc"]}
    assert default[1.0]["value"] >= 0.85 and default[25.0]["value"] >= 0.85
    assert checks["subtle", "832x1024"]["study_status"] == "no-recommendation"
    # compressed at the seed study's size, the lesions outlive CR 5000 (docs/cr-study.md)
    full = {r["cr"]: r for r in checks["default", "3328x4096"]["auroc"]}
    assert list(full) == [1.0, 100.0, 1000.0, 5000.0, 10000.0, 11000.0]
    assert full[5000.0]["ci_low"] > 0.8 and default[5000.0]["ci_high"] < 0.7


def test_subtle_preset_keeps_the_harder_lesions(tmp_path: Path) -> None:
    subtle = PhantomConfig.from_overrides({}, preset="subtle")
    default = PhantomConfig()
    assert subtle.mass_contrast < default.mass_contrast
    assert subtle.mass_radius_mm[1] < default.mass_radius_mm[0] + 1
    assert subtle.calc_size_mm[1] < default.calc_size_mm[0]
    # --config overrides the preset
    both = PhantomConfig.from_overrides({"mass_contrast": 0.2}, preset="subtle")
    assert (both.mass_contrast, both.calc_contrast) == (0.2, PRESETS["subtle"]["calc_contrast"])
    out = tmp_path / "subtle"
    result = invoke("synth", "--out-dir", out, "--size", "256x320", "--preset", "subtle")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "phantom.json").read_text())
    assert record["preset"] == "subtle" and record["config"]["mass_contrast"] == 0.1
    bad = invoke("synth", "--out-dir", tmp_path / "x", "--preset", "faint")
    assert bad.exit_code == 2 and "unknown phantom preset 'faint'" in bad.output


def _breasts(output: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [line["breast"] for line in lines if "breast" in line]


def test_default_synth_is_read_as_the_card_says(tmp_path: Path) -> None:
    data = tmp_path / "phantoms"
    made = invoke(
        "synth", "--out-dir", data, "--studies", "24", "--size", "832x1024",
        "--seed", str(HELD_OUT_SEED),
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    result = invoke("classify", data, "--cr", "25", "--json")
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.stderr  # the training geometry: nothing to warn about
    with (data / "truth.csv").open(newline="") as fh:
        truth = {
            (r["study_uid"], r["laterality"]): r["label"] == "malignant" for r in csv.DictReader(fh)
        }
    breasts = _breasts(result.stdout)
    assert len(breasts) == 48
    y = np.array([truth[(str(b["study_uid"]), str(b["laterality"]))] for b in breasts], dtype=int)
    assert 0.25 < y.mean() < 0.75
    for key in ("probability_original", "probability"):  # CR 1 and CR 25
        p = np.array([float(b[key]) for b in breasts])  # type: ignore[arg-type]
        assert stats.auroc(y, p) >= 0.85, key


@pytest.mark.slow
def test_full_size_default_synth_is_read_as_well(tmp_path: Path) -> None:
    """`crgate synth` with no options but the count: the seed study's 3328x4096 at 0.07 mm (a
    quarter of the training spacing, the same field of view): no warning, AUROC >= 0.85 at CR 1
    and CR 25 (1.00 on these 16 breasts; about 90 s on 2 cores)."""
    data = tmp_path / "full"
    made = invoke("synth", "--out-dir", data, "--studies", "8", "--seed", str(HELD_OUT_SEED + 1))
    assert made.exit_code == 0, made.output
    result = invoke("classify", data, "--cr", "25", "--json")
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.stderr
    with (data / "truth.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    header = pydicom.dcmread(data / rows[0]["file"], stop_before_pixels=True)
    assert (header.Columns, header.Rows, float(header.PixelSpacing[0])) == (3328, 4096, 0.07)
    truth = {(r["study_uid"], r["laterality"]): r["label"] == "malignant" for r in rows}
    breasts = _breasts(result.stdout)
    y = np.array([truth[(str(b["study_uid"]), str(b["laterality"]))] for b in breasts], dtype=int)
    assert len(breasts) == 16 and 0 < y.sum() < 16
    for key in ("probability_original", "probability"):
        p = np.array([float(b[key]) for b in breasts])  # type: ignore[arg-type]
        assert stats.auroc(y, p) >= 0.85, key


def test_classify_warns_far_from_the_training_geometry(tmp_path: Path) -> None:
    config = tmp_path / "fine.json"
    config.write_text(
        json.dumps(
            {"pixel_spacing_mm": 0.05, "mass_radius_mm": [2, 3], "calc_cluster_radius_mm": [1, 2]}
        )
    )
    data = tmp_path / "fine"
    made = invoke("synth", "--out-dir", data, "--size", "832x1024", "--config", config)
    assert made.exit_code == 0, made.output
    result = invoke("classify", data, "--cr", "1", "--json")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr  # one line for the four views of one geometry
    assert "and 3 more: 832x1024 at 0.05 mm is far from the 832x1024 at 0.28 mm" in warnings[0]
    assert "pixel spacing 0.05 mm against 0.28 mm" in warnings[0]
    assert "field of view 42 x 51 mm against 233 x 287 mm" in warnings[0]
