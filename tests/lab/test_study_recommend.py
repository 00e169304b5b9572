"""The recommendation on constructed curves (flat, early drop, noisy, all fail), directly on
(difference, lower bound) values and through the paired bootstrap on constructed scores."""

from __future__ import annotations

import numpy as np
import pytest

from services.lab.safety.paired import paired_bootstrap
from services.lab.safety.recommend import guideline_checks, recommend

CRS = [1, 15, 20, 25, 50, 100, 500, 1000, 5000, 10000, 11000]
MARGIN = 0.02


def _run(bounds: list[float]) -> tuple[object, ...]:
    rec = recommend(CRS, [0.0] * len(CRS), bounds, margin=MARGIN)
    return rec.status, rec.cr, rec.first_failure, rec.passes_above_failure


def test_flat_curve_recommends_the_highest_tested_cr() -> None:
    rec = recommend(CRS, [0.0] * 11, [0.0] + [-0.01] * 10, margin=MARGIN)
    assert (rec.status, rec.cr, rec.first_failure) == ("all-pass", 11000, None)
    assert all(v.non_inferior for v in rec.verdicts)
    assert [v.cr for v in rec.verdicts] == CRS[1:]  # CR 1 is the reference, not a verdict
    assert "limit may lie higher" in rec.message


def test_early_drop_stops_before_the_first_failure() -> None:
    bounds = [0, -0.005, -0.01, -0.03, -0.05, -0.1, -0.2, -0.3, -0.4, -0.4, -0.4]
    assert _run(bounds) == ("partial", 20, 25, [])


def test_noisy_curve_does_not_jump_over_a_failure() -> None:
    # 50 fails, 100 and 500 pass again: the recommendation stays below the failure
    bounds = [0, -0.01, -0.01, -0.015, -0.021, -0.019, -0.01, -0.05, -0.2, -0.3, -0.3]
    status, cr, first, above = _run(bounds)
    assert (status, cr, first) == ("partial", 25, 50)
    assert above == [100, 500]
    rec = recommend(CRS, [0.0] * 11, bounds, margin=MARGIN)
    assert "pass again" in rec.message


def test_all_fail() -> None:
    rec = recommend(CRS, [-0.1] * 11, [0.0] + [-0.2] * 10, margin=MARGIN)
    assert (rec.status, rec.cr, rec.first_failure) == ("none-pass", None, 15)
    assert "even the lowest tested CR above 1 fails" in rec.message
    checks = guideline_checks(rec)
    assert all(g.within_recommendation is False for g in checks)


def test_bound_equal_to_minus_margin_fails() -> None:
    rec = recommend([1, 25], [0, -0.01], [0, -MARGIN], margin=MARGIN)
    assert (rec.status, rec.cr) == ("none-pass", None)
    rec = recommend([1, 25], [0, -0.01], [0, -MARGIN + 1e-9], margin=MARGIN)
    assert (rec.status, rec.cr) == ("all-pass", 25)


def test_order_of_the_input_does_not_matter() -> None:
    rec = recommend([100, 1, 25], [-0.1, 0, 0], [-0.2, 0, -0.01], margin=MARGIN)
    assert (rec.status, rec.cr, rec.first_failure) == ("partial", 25, 100)


def test_only_cr_1() -> None:
    rec = recommend([1], [0.0], [0.0], margin=MARGIN)
    assert (rec.status, rec.cr, rec.verdicts) == ("no-lossy", None, [])
    assert all(g.within_recommendation is None for g in guideline_checks(rec))


def test_guideline_presets_for_mammography() -> None:
    rec = recommend([1, 15, 25], [0, 0, -0.1], [0, -0.01, -0.2], margin=MARGIN)
    checks = guideline_checks(rec, "MG")
    assert [(g.preset, g.max_cr) for g in checks] == [("DRG", 15), ("RCR", 20), ("CAR", 25)]
    drg, rcr, car = checks
    assert (drg.tested, drg.non_inferior, drg.within_recommendation) == (True, True, True)
    assert (rcr.tested, rcr.non_inferior, rcr.within_recommendation) == (False, None, False)
    assert (car.tested, car.non_inferior, car.within_recommendation) == (True, False, False)


# ---------------------------------------------------------------------- constructed scores


def _scores(kind: str, n: int = 240) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Labels and per-CR scores of the same breasts: ``flat`` (the same scores at every CR),
    ``drop`` (the signal fades from the third CR on), ``all-fail`` (gone at every lossy CR)."""
    rng = np.random.default_rng(7)
    y = np.repeat([0, 1], n // 2)
    signal = y * 1.2 + rng.normal(0, 1, n)
    crs = [1, 15, 25, 100, 1000]
    rows = []
    for k in range(len(crs)):
        if kind == "flat":
            strength = 1.0
        elif kind == "drop":
            strength = 1.0 if k < 2 else 0.35 / k
        else:
            strength = 1.0 if k == 0 else 0.1
        noise = rng.normal(0, 1, n)
        rows.append(strength * signal + (1 - strength) * noise)
    return y, np.stack(rows), crs


@pytest.mark.parametrize(
    ("kind", "status", "cr"),
    [("flat", "all-pass", 1000), ("drop", "partial", 15), ("all-fail", "none-pass", None)],
)
def test_through_the_paired_bootstrap(kind: str, status: str, cr: int | None) -> None:
    y, scores, crs = _scores(kind)
    paired = paired_bootstrap(y, scores, resamples=200, seed=0)
    deltas = paired.auroc_delta
    rec = recommend(crs, [d.value for d in deltas], [d.lower_bound for d in deltas], margin=MARGIN)
    assert (rec.status, rec.cr) == (status, cr)
