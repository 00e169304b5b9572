"""Classification statistics: AUROC, AUPRC (average precision) and bootstrap confidence intervals.

Pure numpy, equal to scikit-learn's ``roc_auc_score`` and ``average_precision_score``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata

Scores = npt.NDArray[np.floating[Any]]
Labels = npt.NDArray[Any]


def auroc(labels: Labels, scores: Scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties)."""
    y = np.asarray(labels).astype(bool)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("AUROC needs both classes among the labels")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    u = ranks[y].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def auprc(labels: Labels, scores: Scores) -> float:
    """Average precision: sum over thresholds of (recall step) x precision, as scikit-learn."""
    y = np.asarray(labels).astype(bool)
    positives = int(y.sum())
    if positives == 0:
        raise ValueError("AUPRC needs at least one positive label")
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # one threshold per distinct score: the last index of each run of equal scores
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / positives
    steps = np.diff(np.r_[0.0, recall])
    return float(np.sum(steps * precision))


@dataclass(frozen=True)
class Estimate:
    value: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high}


def bootstrap(
    metric: Callable[[Labels, Scores], float],
    labels: Labels,
    scores: Scores,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """The metric with a percentile bootstrap CI over cases (resamples lacking a class skipped)."""
    y = np.asarray(labels)
    s = np.asarray(scores)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        values.append(metric(y[idx], s[idx]))
    if not values:
        raise ValueError("bootstrap needs both classes among the labels")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Estimate(metric(y, s), float(low), float(high))
