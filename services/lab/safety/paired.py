"""Paired bootstrap over breasts, ROC/PR curve points and distribution summaries.

Every CR is scored on the same breasts, so one resample of breasts (indices drawn with
replacement) is applied to all CRs at once: the AUROC of each CR and its difference to the
reference (CR 1) come from the same resampled breasts, and the spread of the difference holds
only what the CR changed, not which breasts were drawn. Resamples that lack a class are skipped
for all CRs alike (none left: every interval is NaN). With a single CR and the same seed the
intervals are exactly those of :func:`services.core.stats.bootstrap`.

Intervals are percentile intervals: two-sided ``confidence`` (default 95 %) for the metrics and
their differences, and for non-inferiority the one-sided lower bound, the ``1 - confidence``
quantile of the differences (the 5th percentile for 95 %).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from services.core.stats import Estimate, auprc, auroc

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class Difference:
    """A metric's difference to the reference, with its two-sided CI and one-sided bound."""

    value: float
    ci_low: float
    ci_high: float
    lower_bound: float  # one-sided: the difference is above this with ``confidence``

    def as_dict(self) -> dict[str, float]:
        return {
            "value": self.value,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "one_sided_lower": self.lower_bound,
        }


@dataclass(frozen=True)
class PairedResult:
    auroc: list[Estimate]
    auprc: list[Estimate]
    auroc_delta: list[Difference]  # against the reference condition (its own entry is 0)
    auprc_delta: list[Difference]
    resamples_used: int


def paired_bootstrap(
    labels: Array,
    scores: Array,
    *,
    reference: int = 0,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedResult:
    """AUROC and AUPRC of each row of ``scores`` ([conditions, cases]) with paired CIs."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != y.shape[0]:
        raise ValueError(f"scores must be [conditions, {y.shape[0]}], got {list(s.shape)}")
    if y.min() == y.max():
        raise ValueError("the paired bootstrap needs both classes among the labels")
    k, n = s.shape
    rng = np.random.default_rng(seed)
    roc_values: list[list[float]] = []
    pr_values: list[list[float]] = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        yi = y[idx]
        if yi.min() == yi.max():
            continue
        roc_values.append([auroc(yi, s[c, idx]) for c in range(k)])
        pr_values.append([auprc(yi, s[c, idx]) for c in range(k)])
    if not roc_values:  # intervals undefined (NaN); the study withholds its recommendation
        roc_values = pr_values = [[np.nan] * k]
    roc = np.array(roc_values)
    pr = np.array(pr_values)
    roc_point = np.array([auroc(y, s[c]) for c in range(k)])
    pr_point = np.array([auprc(y, s[c]) for c in range(k)])
    return PairedResult(
        auroc=_estimates(roc_point, roc, confidence),
        auprc=_estimates(pr_point, pr, confidence),
        auroc_delta=_differences(roc_point, roc, reference, confidence),
        auprc_delta=_differences(pr_point, pr, reference, confidence),
        resamples_used=int(np.isfinite(roc[:, 0]).sum()),
    )


def _estimates(point: Array, boot: Array, confidence: float) -> list[Estimate]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail], axis=0)
    return [
        Estimate(float(v), float(a), float(b)) for v, a, b in zip(point, low, high, strict=True)
    ]


def _differences(point: Array, boot: Array, reference: int, confidence: float) -> list[Difference]:
    delta = boot - boot[:, [reference]]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(delta, [tail, 100 - tail], axis=0)
    bound = np.percentile(delta, (1 - confidence) * 100, axis=0)
    values = point - point[reference]
    return [
        Difference(float(v), float(a), float(b), float(c))
        for v, a, b, c in zip(values, low, high, bound, strict=True)
    ]


# ---------------------------------------------------------------------- curves


def roc_points(labels: Array, scores: Array) -> tuple[Array, Array]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0);
    equal to scikit-learn's ``roc_curve(..., drop_intermediate=False)``."""
    y, s = _sorted(labels, scores)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, fp / max(1, fp[-1])], np.r_[0.0, tp / max(1, tp[-1])]


def pr_points(labels: Array, scores: Array) -> tuple[Array, Array]:
    """(recall, precision) at every distinct threshold, highest threshold first, ending at
    recall 0 / precision 1 as scikit-learn's ``precision_recall_curve`` (reversed) does."""
    y, s = _sorted(labels, scores)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / max(1, tp[-1])
    return np.r_[0.0, recall], np.r_[1.0, precision]


def _sorted(labels: Array, scores: Array) -> tuple[Array, Array]:
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    return y[order], s[order]


# ---------------------------------------------------------------------- summaries


def describe(values: Array) -> dict[str, float | int | None]:
    """Median, quartiles, min and max of the finite values (None when there are none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "median": None, "q25": None, "q75": None, "min": None, "max": None}
    q25, median, q75 = np.percentile(v, [25, 50, 75])
    return {
        "n": int(v.size),
        "median": float(median),
        "q25": float(q25),
        "q75": float(q75),
        "min": float(v.min()),
        "max": float(v.max()),
    }
