"""When the CR study withholds its recommendation: the power calculation, the chance floor, the
bootstrap's classes, and what the report says would be needed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from services.lab.safety.evidence import (
    CHANCE_FLOOR,
    Evidence,
    assess,
    minimum_per_class,
    per_class_above_floor,
)
from services.lab.safety.paired import paired_bootstrap
from services.lab.safety.panel import panel_crs
from services.lab.safety.recommend import guideline_checks, recommend, withhold


def _hand_minimum(margin: float) -> int:
    # the docstring's formula by hand: A 0.85, r 0.9, one-sided 95 %, power 80 %
    a = 0.85
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    variance = 2 * (1 - 0.9) * ((q1 - a * a) + (q2 - a * a))
    return math.ceil((1.6448536 + 0.8416212) ** 2 * variance / margin**2)


def test_power_calculation() -> None:
    assert minimum_per_class(0.02, 0.95) == _hand_minimum(0.02) == 233
    assert minimum_per_class(0.05, 0.95) == _hand_minimum(0.05) == 38
    # a wider margin, a lower confidence or a higher correlation need fewer breasts
    assert minimum_per_class(0.03, 0.95) < 233
    assert minimum_per_class(0.02, 0.9) < 233
    assert minimum_per_class(0.02, 0.95, correlation=0.95) < 233


def test_breasts_for_a_ci_above_the_floor() -> None:
    assert per_class_above_floor(0.5, 0.95) is None
    assert per_class_above_floor(CHANCE_FLOOR, 0.95) is None
    n70, n90 = per_class_above_floor(0.7, 0.95), per_class_above_floor(0.9, 0.95)
    assert n70 is not None and n90 is not None and n90 < n70
    # at that many per class the Hanley-McNeil CI's lower end is just above the floor
    a = 0.7
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt(((q1 - a * a) + (q2 - a * a)) / n70)
    assert a - 1.959964 * se > CHANCE_FLOOR
    se_less = math.sqrt(((q1 - a * a) + (q2 - a * a)) / (n70 - 1))
    assert a - 1.959964 * se_less <= CHANCE_FLOOR


def _assess(**kwargs: Any) -> Evidence:
    base: dict[str, Any] = {
        "malignant": 300,
        "normal": 300,
        "reference_auroc": 0.9,
        "reference_ci_low": 0.86,
        "resamples": 1000,
        "resamples_used": 1000,
        "margin": 0.02,
        "confidence": 0.95,
    }
    return assess(**{**base, **kwargs})


def test_enough_data_withholds_nothing() -> None:
    evidence = _assess()
    assert evidence.sufficient and evidence.reasons == [] and evidence.needed == ""


def test_too_few_breasts_says_how_many_more() -> None:
    evidence = _assess(malignant=2, normal=2, reference_auroc=1.0, reference_ci_low=1.0)
    assert not evidence.sufficient
    assert evidence.reasons == [
        "too few breasts: 2 malignant and 2 normal, below the minimum of 233 per class "
        "(power calculation)"
    ]
    assert (evidence.more_malignant, evidence.more_normal) == (231, 231)
    assert "231 more malignant and 231 more normal" in evidence.needed


def test_override_of_the_minimum_is_named() -> None:
    evidence = _assess(malignant=4, normal=4, min_per_class=2)
    assert evidence.sufficient and evidence.min_per_class == 2
    assert "--min-per-class 2" in evidence.min_source
    assert "233" in evidence.min_source


def test_reference_near_chance() -> None:
    evidence = _assess(reference_auroc=0.62, reference_ci_low=0.55)
    assert len(evidence.reasons) == 1 and "near chance" in evidence.reasons[0]
    assert evidence.more_malignant > 0
    at_floor = _assess(reference_ci_low=CHANCE_FLOOR)
    assert not at_floor.sufficient
    hopeless = _assess(reference_auroc=0.5, reference_ci_low=0.4)
    assert "no number of breasts" in hopeless.needed


def test_bootstrap_missing_a_class() -> None:
    evidence = _assess(resamples_used=950)
    assert len(evidence.reasons) == 1
    assert "50 of 1000 resamples held one class only" in evidence.reasons[0]
    assert _assess(resamples_used=990).sufficient
    assert not _assess(resamples_used=0, reference_ci_low=float("nan")).sufficient


def test_withheld_recommendation_is_its_own_status() -> None:
    rec = recommend([1, 25, 100], [0, 0, 0], [0, 0, 0], margin=0.02)
    assert (rec.status, rec.cr) == ("all-pass", 100)
    held = withhold(rec, ["too few breasts"], "about 3 more")
    assert (held.status, held.cr) == ("no-recommendation", None)
    assert held.verdicts == rec.verdicts
    assert held.message.startswith("too few breasts; needed: about 3 more")
    assert all(g.within_recommendation is None for g in guideline_checks(held))
    assert withhold(rec, [], "") is rec


def test_a_bootstrap_without_both_classes_gives_undefined_intervals() -> None:
    # one malignant among two breasts: about half the resamples lack a class; with one
    # resample that lacks it every interval is NaN and none is used
    y = np.array([0, 1])
    scores = np.array([[0.2, 0.8], [0.3, 0.7]])
    paired = paired_bootstrap(y, scores, resamples=100, seed=0)
    assert 20 < paired.resamples_used < 80
    for seed in range(50):
        one = paired_bootstrap(y, scores, resamples=1, seed=seed)
        if one.resamples_used == 0:
            assert math.isnan(one.auroc[0].ci_low) and one.auroc[0].value == 1.0
            break
    else:
        pytest.fail("no seed drew a one-class resample")


@pytest.mark.parametrize(
    ("crs", "expected"),
    [
        ((1, 25, 100), (1, 25, 100)),
        ((1, 20, 1000), (1, 20, 1000)),
        ((1,), (1,)),
        ((1, 15, 20, 25, 50, 100, 500, 1000, 5000, 10000, 11000), (1, 100, 5000, 11000)),
        ((1, 15, 20, 25, 50, 500), (1, 15, 25, 500)),
    ],
)
def test_panel_shows_only_asked_crs(crs: tuple[float, ...], expected: tuple[float, ...]) -> None:
    assert panel_crs(crs) == tuple(float(c) for c in expected)
