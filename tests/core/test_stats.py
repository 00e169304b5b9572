"""AUROC / AUPRC against scikit-learn and hand-checked cases; bootstrap confidence intervals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from services.core.stats import auprc, auroc, bootstrap


def test_hand_checked_case() -> None:
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    # pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4): 3 of 4
    assert auroc(labels, scores) == 0.75
    # ranking 0.8(+) 0.4(-) 0.35(+) 0.1(-): AP = 1/2 * 1 + 1/2 * 2/3
    assert auprc(labels, scores) == pytest.approx(0.5 + 1 / 3)


def test_ties_count_half() -> None:
    assert auroc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 20)), min_size=4, max_size=60).filter(
        lambda rows: 0 < sum(r[0] for r in rows) < len(rows)
    )
)
def test_equal_to_scikit_learn(rows: list[tuple[bool, int]]) -> None:
    labels = np.array([r[0] for r in rows], dtype=int)
    scores = np.array([r[1] / 20 for r in rows])  # coarse scores: many ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert auprc(labels, scores) == pytest.approx(average_precision_score(labels, scores))


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_n() -> None:
    rng = np.random.default_rng(0)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        return y, y * 0.8 + rng.normal(0, 0.6, n)

    few = sample(60)
    small = bootstrap(auroc, *few, resamples=400, seed=1)
    large = bootstrap(auroc, *sample(2000), resamples=400, seed=1)
    assert small.ci_low <= small.value <= small.ci_high
    assert large.ci_low <= large.value <= large.ci_high
    assert (large.ci_high - large.ci_low) < (small.ci_high - small.ci_low) / 3
    assert bootstrap(auroc, *few, resamples=400, seed=1) == small  # deterministic by seed


def test_one_class_is_refused() -> None:
    with pytest.raises(ValueError, match="both classes"):
        auroc(np.array([1, 1]), np.array([0.2, 0.3]))
    with pytest.raises(ValueError, match="positive"):
        auprc(np.array([0, 0]), np.array([0.2, 0.3]))
