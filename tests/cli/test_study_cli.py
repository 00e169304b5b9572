"""``crgate study`` end to end on a few small phantoms with the shipped model: the report folder
and its consistency, resuming (a longer CR list, and a run killed half way), bad input.

One study run (8 breasts, CRs 1, 20, 1000, 200 bootstrap resamples, 2 worker processes) is
shared by the report tests; the resume tests work on copies of its folders.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from typer.testing import CliRunner, Result

from services.cli import app
from services.core.config import get_settings
from services.core.inference.card import load_card
from tests.processes import in_own_session, kill_and_collect_survivors, session_processes

CRGATE = Path(sys.executable).parent / "crgate"
runner = CliRunner()
FIGURES = ("roc.png", "pr.png", "auroc_vs_cr.png", "psnr_vs_cr.png", "saliency.png")
TABLES = ("metrics.csv", "predictions.csv", "views.csv", "guidelines.csv")


def invoke(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def assert_ok(result: Result) -> None:
    assert result.exception is None, f"{result.exception!r}\n{result.output}"
    assert result.exit_code == 0, result.output


def assert_fails(result: Result, code: int, *reasons: str) -> str:
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for reason in reasons:
        assert re.search(reason, errors[0]), f"{reason!r} not in {errors[0]!r}"
    return errors[0]


@dataclass(frozen=True)
class Study:
    data: Path
    out: Path
    cache: Path
    result: Result


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("study-phantoms")
    assert_ok(
        invoke("synth", "--out-dir", data, "--studies", "4", "--size", "416x512", "--seed", "7")
    )
    return data


@pytest.fixture(scope="module")
def study(phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> Study:
    root = tmp_path_factory.mktemp("study-run")
    out, cache = root / "report", root / "cache"
    result = invoke(
        "study",
        "--data",
        phantoms,
        "--out",
        out,
        "--crs",
        "1,20,1000",
        "--bootstrap",
        "200",
        "--cache-dir",
        cache,
        "--workers",
        "2",
    )
    assert_ok(result)
    return Study(phantoms, out, cache, result)


def _results(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    return data


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _cache_entries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.npz"))


# ---------------------------------------------------------------------- report


def test_report_files(study: Study) -> None:
    for name in (*FIGURES, *TABLES, "results.json", "report.html"):
        path = study.out / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in FIGURES:
        assert (study.out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (study.out / "report.html").read_text()
    for name in (*FIGURES, *TABLES):
        assert f"'{name}'" in html
    assert "recommended CR" in html or "no CR is recommended" in html
    assert "CR 20" in study.result.stdout and "report:" in study.result.stdout


def test_results_are_consistent(study: Study) -> None:
    data = _results(study.out)
    settings = get_settings()
    card = load_card(settings.models_dir / f"{settings.default_model}.json")
    assert data["model"]["sha256"] == card.sha256
    assert data["settings"]["crs"] == [1.0, 20.0, 1000.0]
    assert data["settings"]["bootstrap"] == 200 and data["settings"]["margin"] == 0.02
    assert data["data"]["breasts"] == 8 and data["data"]["views"] == 16
    assert data["run"]["computed"] == [1.0, 20.0, 1000.0]
    assert data["run"]["cache_misses"] == 32 and data["run"]["cache_hits"] == 0

    predictions = _csv(study.out / "predictions.csv")
    assert len(predictions) == 3 * 8
    metrics = {float(r["cr"]): r for r in _csv(study.out / "metrics.csv")}
    margin = data["settings"]["margin"]
    for row in data["per_cr"]:
        cr = row["cr"]
        mine = [p for p in predictions if float(p["cr"]) == cr]
        labels = np.array([int(p["label"]) for p in mine])
        probs = np.array([float(p["probability"]) for p in mine])
        assert row["auroc"]["value"] == pytest.approx(roc_auc_score(labels, probs))
        assert row["auprc"]["value"] == pytest.approx(average_precision_score(labels, probs))
        assert row["auroc"]["ci_low"] <= row["auroc"]["value"] <= row["auroc"]["ci_high"]
        assert row["flips"] == sum(int(p["flipped"]) for p in mine)
        assert float(metrics[cr]["auroc"]) == pytest.approx(row["auroc"]["value"], rel=1e-5)
        assert row["n_views"] == 16
        if cr == 1:
            assert row["non_inferior"] is None and row["auroc_delta"]["value"] == 0
            assert row["psnr_db"]["min"] == 100.0 and row["achieved_cr"]["max"] == 1.0
        else:
            assert row["non_inferior"] == (row["auroc_delta"]["one_sided_lower"] > -margin)
            assert row["psnr_db"]["max"] < 100.0
            assert 0 < row["ssim"]["median"] < 1
    achieved = {r["cr"]: r["achieved_cr"]["median"] for r in data["per_cr"]}
    assert 19 < achieved[20.0] < 21.5

    rec = data["recommendation"]
    verdicts = {v["cr"]: v["non_inferior"] for v in rec["verdicts"]}
    # 8 breasts are far below the power calculation's 233 per class: no recommendation
    assert (rec["status"], rec["cr"]) == ("no-recommendation", None)
    assert set(verdicts) == {20.0, 1000.0}  # the verdicts stay, for information
    evidence = data["evidence"]
    assert evidence["min_per_class"] == 233 and evidence["min_source"] == "power calculation"
    malignant = data["data"]["malignant"]
    assert (evidence["malignant"], evidence["normal"]) == (malignant, 8 - malignant)
    assert evidence["more_malignant"] == 233 - malignant
    assert evidence["more_normal"] == 233 - (8 - malignant)
    assert evidence["sufficient"] is False and data["settings"]["min_per_class"] is None
    presets = {g["preset"]: g["max_cr"] for g in data["guidelines"]["presets"]}
    assert presets == {"CAR": 25.0, "DRG": 15.0, "RCR": 20.0}
    rcr = next(g for g in data["guidelines"]["presets"] if g["preset"] == "RCR")
    assert rcr["tested"] and rcr["non_inferior"] == verdicts[20.0]
    assert rcr["within_recommendation"] is None
    assert data["data"]["phantom_preset"] == "default"
    assert not any("preset" in note for note in data["notes"])  # the model's own preset
    assert data["model"]["not_for_clinical_use"] is True
    assert data["model"]["intended_use"] == card.intended_use
    assert data["model"]["training_data"] == card.training["data"]

    panel = data["saliency_panel"]
    assert [t["cr"] for t in panel["tiles"]] == [1.0, 20.0, 1000.0]  # only the asked CRs
    malignant = {f"{p['study_uid']}/{p['laterality']}" for p in predictions if p["label"] == "1"}
    assert panel["breast"] in malignant


def test_two_studies_get_no_recommendation(tmp_path: Path) -> None:
    """The issue's case: 2 studies (4 breasts) of the generator's then defaults (now the subtle
    preset) printed a big green "recommended CR: 100"."""
    data = tmp_path / "phantoms"
    synth = ("synth", "--out-dir", data, "--studies", "2", "--size", "416x512")
    assert_ok(invoke(*synth, "--preset", "subtle"))
    out = tmp_path / "report"
    args = ["study", "--data", data, "--out", out, "--crs", "25,100", "--bootstrap", "100"]
    result = invoke(*args, "--cache-dir", tmp_path / "cache", "--workers", "1")
    assert_ok(result)
    results = _results(out)
    rec = results["recommendation"]
    assert (rec["status"], rec["cr"]) == ("no-recommendation", None)
    malignant = results["evidence"]["malignant"]
    normal = results["evidence"]["normal"]
    assert malignant + normal == 4
    needed = f"about {233 - malignant} more malignant and {233 - normal} more normal breasts"
    assert needed in rec["message"]
    assert "recommendation: " not in result.stdout
    assert re.search(r"^NO RECOMMENDATION: too few breasts", result.stdout, re.M)
    assert "NOT FOR CLINICAL USE" in result.stdout
    html = (out / "report.html").read_text()
    assert results["data"]["phantom_preset"] == "subtle"
    mismatch = "the phantoms are of preset 'subtle' but the model was trained on preset 'default'"
    assert any(note.startswith(mismatch) for note in results["notes"]), results["notes"]
    assert "recommended CR: " not in html  # the headline of a recommendation
    assert "class='box no-recommendation'" in html
    assert "no recommendation: the data cannot support one" in html
    assert needed in html
    # the card's intended use and training data come first, with the clinical warning
    head = html[: html.index("class='box")]
    assert "Not for clinical use" in head and "Intended use" in head and "Training data" in head
    assert [t["cr"] for t in results["saliency_panel"]["tiles"]] == [1.0, 25.0, 100.0]
    assert "one malignant case at CR 1, 25, 100" in html


def test_a_lower_minimum_is_shown_in_the_report(study: Study, tmp_path: Path) -> None:
    out, cache = _copy_run(study, tmp_path)
    args = ["study", "--data", study.data, "--out", out, "--crs", "1,20,1000"]
    result = invoke(
        *args, "--bootstrap", "200", "--cache-dir", cache, "--workers", "1", "--min-per-class", "2"
    )
    assert_ok(result)
    data = _results(out)
    assert data["settings"]["min_per_class"] == 2
    evidence = data["evidence"]
    assert evidence["min_per_class"] == 2 and "--min-per-class 2" in evidence["min_source"]
    html = (out / "report.html").read_text()
    assert "given (--min-per-class 2; the power calculation says 233)" in html
    rec = data["recommendation"]
    verdicts = {v["cr"]: v["non_inferior"] for v in rec["verdicts"]}
    reference = data["per_cr"][0]["auroc"]
    if reference["ci_low"] <= 0.6 or data["bootstrap_resamples_used"] < 198:
        assert (rec["status"], rec["cr"]) == ("no-recommendation", None)
    elif verdicts[20.0] and verdicts[1000.0]:
        assert (rec["status"], rec["cr"]) == ("all-pass", 1000.0)
        assert "recommended CR: 1000" in html
    elif verdicts[20.0]:
        assert (rec["status"], rec["cr"]) == ("partial", 20.0)
    else:
        assert (rec["status"], rec["cr"]) == ("none-pass", None)


# ---------------------------------------------------------------------- resume


def _copy_run(study: Study, tmp_path: Path) -> tuple[Path, Path]:
    out, cache = tmp_path / "report", tmp_path / "cache"
    shutil.copytree(study.out, out)
    shutil.copytree(study.cache, cache)
    return out, cache


def test_a_longer_cr_list_reuses_the_finished_crs(study: Study, tmp_path: Path) -> None:
    out, cache = _copy_run(study, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "partial").iterdir()}
    result = invoke(
        "study",
        "--data",
        study.data,
        "--out",
        out,
        "--crs",
        "1,20,1000,50",
        "--bootstrap",
        "200",
        "--cache-dir",
        cache,
        "--workers",
        "1",
    )
    assert_ok(result)
    assert "reused 3 finished CR(s)" in result.stdout
    data = _results(out)
    assert data["run"]["computed"] == [50.0] and data["run"]["reused"] == [1.0, 20.0, 1000.0]
    assert (data["run"]["cache_hits"], data["run"]["cache_misses"]) == (0, 16)
    assert {p: (out / "partial" / p).stat().st_mtime_ns for p in before} == before
    assert [r["cr"] for r in data["per_cr"]] == [1.0, 20.0, 50.0, 1000.0]


def test_a_killed_run_resumes_without_recomputing(study: Study, tmp_path: Path) -> None:
    out, cache = tmp_path / "report", tmp_path / "cache"
    args = [
        "study",
        "--data",
        str(study.data),
        "--out",
        str(out),
        "--crs",
        "1,100,5000,11000",
        "--bootstrap",
        "200",
        "--cache-dir",
        str(cache),
        "--workers",
        "1",
    ]
    first_partial = out / "partial" / "cr-1.json"
    with Running([str(CRGATE), *args]) as proc:
        deadline = time.monotonic() + 120
        while not first_partial.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "CR 1 was not finished within 2 minutes"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stamp = first_partial.stat().st_mtime_ns
    made = len(_cache_entries(cache))  # copies finished before the kill
    assert not (out / "results.json").exists()

    result = invoke(*args)
    assert_ok(result)
    data = _results(out)
    assert 1.0 in data["run"]["reused"] and 1.0 not in data["run"]["computed"]
    assert first_partial.stat().st_mtime_ns == stamp
    # every copy made before the kill was used, none made twice
    assert data["run"]["cache_hits"] == made
    assert data["run"]["cache_misses"] == 16 * len(data["run"]["computed"]) - made
    assert len(_cache_entries(cache)) == 16 * 3


def test_a_killed_run_leaves_no_worker_processes(study: Study, tmp_path: Path) -> None:
    """SIGKILL `crgate study` while its worker pool compresses: within a few seconds nothing of
    the run is left (workers, fork server, resource tracker)."""
    cache = tmp_path / "cache"
    command = [
        str(CRGATE), "study", "--data", str(study.data), "--out", str(tmp_path / "report"),
        "--crs", "1,100,5000,11000", "--bootstrap", "200", "--cache-dir", str(cache),
        "--workers", "2",
    ]  # fmt: skip
    with in_own_session(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        deadline = time.monotonic() + 120
        # the pool is up (fork server and two workers besides crgate) and busy compressing
        while len(session_processes(proc.pid)) < 4 or not _cache_entries(cache):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, session_processes(proc.pid)
            time.sleep(0.02)
        assert kill_and_collect_survivors(proc) == {}


class Running:
    """A subprocess that is killed and reaped however the test ends."""

    def __init__(self, command: list[str]) -> None:
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "COLUMNS": "200"},
        )

    def __enter__(self) -> subprocess.Popen[bytes]:
        return self.proc

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("crs", "reason"),
    [
        ("0,25", r"CR list '0,25': compression ratio '0' is out of range"),
        ("1,-5", r"'-5' is out of range"),
        ("1,nan", r"'nan' is out of range"),
        ("1,,25", r"empty entry"),
    ],
)
def test_bad_cr_lists(phantoms: Path, tmp_path: Path, crs: str, reason: str) -> None:
    result = invoke("study", "--data", phantoms, "--out", tmp_path / "o", "--crs", crs)
    assert_fails(result, 2, reason)
    assert not (tmp_path / "o").exists()


def test_model_without_card(phantoms: Path, tmp_path: Path) -> None:
    settings = get_settings()
    card = load_card(settings.models_dir / f"{settings.default_model}.json")
    onnx = tmp_path / "site-model.onnx"
    shutil.copyfile(settings.models_dir / card.file, onnx)
    result = invoke("study", "--data", phantoms, "--out", tmp_path / "o", "--model", onnx)
    assert_fails(result, 2, r"site-model\.onnx has no card \(site-model\.json beside it\)")
    result = invoke("study", "--data", phantoms, "--out", tmp_path / "o", "--model", "nosuch")
    assert_fails(result, 6, r"no model 'nosuch'")


def test_labels_that_do_not_match(phantoms: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("study_uid,laterality,label\n1.2.3,L,malignant\n1.2.4,R,normal\n")
    result = invoke("study", "--data", phantoms, "--labels", labels, "--out", tmp_path / "o")
    assert_fails(result, 2, r"2 of 2 labelled breasts have no images", "do not match")


@pytest.mark.parametrize(
    ("option", "value", "code", "reason"),
    [
        ("--bootstrap", "10", 2, "at least 100"),
        ("--margin", "-0.1", 2, "margin -0.1"),
        ("--min-per-class", "0", 2, "minimum breasts per class 0: use 1 or more"),
        ("--encoder", "lossy", 2, "encoder 'lossy'"),
        ("--data", "/nonexistent/folder", 6, "data folder /nonexistent/folder not found"),
    ],
)
def test_bad_options(
    phantoms: Path, tmp_path: Path, option: str, value: str, code: int, reason: str
) -> None:
    args = ["study", "--data", str(phantoms), "--out", str(tmp_path / "o"), option, value]
    assert_fails(invoke(*args), code, reason)


def test_help() -> None:
    result = invoke("study", "--help")
    assert_ok(result)
    for option in (
        "--data",
        "--labels",
        "--model",
        "--crs",
        "--bootstrap",
        "--margin",
        "--out",
        "--cache-dir",
        "--workers",
        "--min-per-class",
    ):
        assert option in result.stdout
