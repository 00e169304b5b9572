"""The study's statistics: curves against scikit-learn, the paired bootstrap against an
independent implementation and hand-checked cases, distribution summaries."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from services.core.stats import auroc, bootstrap
from services.lab.safety.paired import describe, paired_bootstrap, pr_points, roc_points

HAND_LABELS = np.array([0, 0, 1, 1])
HAND_SCORES = np.array([0.1, 0.4, 0.35, 0.8])  # AUROC 3/4 (see tests/core/test_stats.py)


def _data(n: int, seed: int, noise: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.round(y * 0.8 + rng.normal(0, noise, n), 2)  # rounding makes ties


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_points_equal_scikit_learn(seed: int) -> None:
    y, s = _data(80, seed)
    fpr, tpr = roc_points(y, s)
    want_fpr, want_tpr, _ = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, want_fpr)
    np.testing.assert_allclose(tpr, want_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, s))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pr_points_equal_scikit_learn(seed: int) -> None:
    y, s = _data(80, seed)
    recall, precision = pr_points(y, s)
    want_precision, want_recall, _ = precision_recall_curve(y, s)
    np.testing.assert_allclose(recall, want_recall[::-1])
    np.testing.assert_allclose(precision, want_precision[::-1])


def test_one_condition_equals_the_plain_bootstrap() -> None:
    y, s = _data(60, 5)
    paired = paired_bootstrap(y, s[np.newaxis], resamples=300, seed=3)
    assert paired.auroc[0] == bootstrap(auroc, y, s, resamples=300, seed=3)
    assert paired.auroc_delta[0].value == 0.0
    assert paired.auroc_delta[0].ci_low == paired.auroc_delta[0].ci_high == 0.0


def test_hand_checked_paired_difference() -> None:
    # condition 1 reverses the ranking: AUROC 1/4, so the difference is exactly -1/2
    scores = np.stack([HAND_SCORES, 1 - HAND_SCORES, HAND_SCORES])
    paired = paired_bootstrap(HAND_LABELS, scores, resamples=200, seed=0)
    assert [e.value for e in paired.auroc] == [0.75, 0.25, 0.75]
    delta = paired.auroc_delta
    assert delta[1].value == -0.5
    # in every resample AUROC(reversed) = 1 - AUROC(original), so the difference is 1 - 2 AUROC
    assert delta[1].ci_low <= -0.5 <= delta[1].ci_high
    assert delta[1].lower_bound <= delta[1].value
    # an identical condition differs by exactly 0 in every resample
    assert (delta[2].value, delta[2].ci_low, delta[2].ci_high, delta[2].lower_bound) == (0, 0, 0, 0)


def _pairwise_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """AUROC as the share of (malignant, benign) pairs ranked right, ties counting half."""
    pos, neg = s[y == 1][:, np.newaxis], s[y == 0][np.newaxis, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def test_pairwise_reference_is_scikit_learn() -> None:
    y, s = _data(50, 8)
    assert _pairwise_auroc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_paired_intervals_match_an_independent_implementation() -> None:
    y, base = _data(70, 11)
    rng = np.random.default_rng(4)
    scores = np.stack([base, base + rng.normal(0, 0.3, base.size), rng.permutation(base)])
    paired = paired_bootstrap(y, scores, resamples=400, confidence=0.95, seed=9)

    draw = np.random.default_rng(9)  # the same draws, scored pair by pair
    values = []
    for _ in range(400):
        idx = draw.integers(0, y.size, y.size)
        if y[idx].min() == y[idx].max():
            continue
        values.append([_pairwise_auroc(y[idx], row[idx]) for row in scores])
    boot = np.array(values)
    delta = boot - boot[:, [0]]
    for k in range(3):
        low, high = np.percentile(boot[:, k], [2.5, 97.5])
        assert paired.auroc[k].ci_low == pytest.approx(low)
        assert paired.auroc[k].ci_high == pytest.approx(high)
        d_low, d_high = np.percentile(delta[:, k], [2.5, 97.5])
        assert paired.auroc_delta[k].ci_low == pytest.approx(d_low, abs=1e-12)
        assert paired.auroc_delta[k].ci_high == pytest.approx(d_high, abs=1e-12)
        assert paired.auroc_delta[k].lower_bound == pytest.approx(
            np.percentile(delta[:, k], 5), abs=1e-12
        )
    assert paired.resamples_used == len(values)


def test_pairing_narrows_the_difference_interval() -> None:
    """A small perturbation of the same breasts' scores: the paired interval of the difference
    is far narrower than two independent intervals would suggest."""
    y, base = _data(200, 21)
    rng = np.random.default_rng(2)
    scores = np.stack([base, base + rng.normal(0, 0.05, base.size)])
    paired = paired_bootstrap(y, scores, resamples=400, seed=1)
    width = [e.ci_high - e.ci_low for e in paired.auroc]
    d = paired.auroc_delta[1]
    assert d.ci_high - d.ci_low < 0.25 * float(np.hypot(width[0], width[1]))
    assert d.ci_low <= d.value <= d.ci_high
    assert d.ci_low <= d.lower_bound <= d.value + 1e-12


def test_one_class_is_refused() -> None:
    with pytest.raises(ValueError, match="both classes"):
        paired_bootstrap(np.array([1, 1, 1]), np.array([[0.1, 0.2, 0.3]]))
    with pytest.raises(ValueError, match="conditions"):
        paired_bootstrap(HAND_LABELS, HAND_SCORES)


def test_describe() -> None:
    values = np.array([4.0, 1.0, 3.0, 2.0, np.nan])
    d = describe(values)
    assert d == {"n": 4, "median": 2.5, "q25": 1.75, "q75": 3.25, "min": 1.0, "max": 4.0}
    assert describe(np.array([np.nan]))["median"] is None
