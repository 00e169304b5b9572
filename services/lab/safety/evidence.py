"""When the study's data cannot carry a recommendation, and what more it would need.

A recommendation is withheld (status ``no-recommendation``) when any of these holds:

* **too few breasts per class**: fewer than the minimum from the power calculation below (or
  the ``--min-per-class`` override, which the report shows);
* **the reference is near chance**: the lower end of CR 1's AUROC CI is at or below
  :data:`CHANCE_FLOOR` (0.6): a model that barely separates the classes on this set cannot show
  that compression leaves its performance unharmed;
* **the bootstrap could not resample both classes**: more than :data:`MAX_SKIPPED` of the
  resamples held one class only (or none held both), so the intervals are not trustworthy.

Power calculation (docs/cr-study.md, "How many breasts"): the non-inferiority test compares
paired AUROCs. With ``n`` breasts in each class, Hanley & McNeil (1982) give
``Var(AUROC) ~ [(Q1 - A^2) + (Q2 - A^2)] / n`` with ``Q1 = A / (2 - A)`` and
``Q2 = 2 A^2 / (1 + A)``; the difference of two AUROCs measured on the same breasts, correlated
``r``, has ``Var(delta) = 2 (1 - r) Var(AUROC)``. For a one-sided test at level ``1 -
confidence`` with power ``1 - beta`` when the true difference is 0, the margin must be
``(z_confidence + z_power)`` standard errors: ``n = (z_c + z_p)^2 * 2 (1 - r) [(Q1 - A^2) + (Q2 -
A^2)] / margin^2``. Planning values: A = 0.85 (the seed study's AUROC), r = 0.9 (the same model
on a copy of the same image), power 0.8. For margin 0.02 at 95 %: 233 breasts per class.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

PLANNING_AUROC = 0.85
PLANNING_CORRELATION = 0.9
PLANNING_POWER = 0.8
CHANCE_FLOOR = 0.6
MAX_SKIPPED = 0.01  # the share of bootstrap resamples that may lack a class


def _unit_variance(auroc: float) -> float:
    """Hanley-McNeil: ``n * Var(AUROC)`` for ``n`` breasts per class (large ``n``)."""
    q1 = auroc / (2 - auroc)
    q2 = 2 * auroc**2 / (1 + auroc)
    return (q1 - auroc**2) + (q2 - auroc**2)


def minimum_per_class(
    margin: float,
    confidence: float,
    *,
    power: float = PLANNING_POWER,
    auroc: float = PLANNING_AUROC,
    correlation: float = PLANNING_CORRELATION,
) -> int:
    """Breasts per class for the non-inferiority test to have ``power`` (module docstring)."""
    z = NormalDist().inv_cdf
    variance = 2 * (1 - correlation) * _unit_variance(auroc)
    return math.ceil((z(confidence) + z(power)) ** 2 * variance / margin**2)


def per_class_above_floor(
    auroc: float, confidence: float, floor: float = CHANCE_FLOOR
) -> int | None:
    """Breasts per class for an AUROC of ``auroc`` to have its two-sided CI's lower end above
    ``floor`` (Hanley-McNeil); ``None`` when no number would (the AUROC itself is too low)."""
    if not auroc > floor:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return max(1, math.ceil(z**2 * _unit_variance(auroc) / (auroc - floor) ** 2))


@dataclass(frozen=True)
class Evidence:
    """What the data could carry: the rules' inputs, which failed, and what more is needed."""

    min_per_class: int
    min_source: str  # "power calculation" or "given (--min-per-class)"
    planning: dict[str, float]
    malignant: int
    normal: int
    reference_auroc: float
    reference_ci_low: float
    chance_floor: float
    resamples: int
    resamples_used: int
    reasons: list[str] = field(default_factory=list)
    more_malignant: int = 0  # breasts to add for the rules to be met (an estimate)
    more_normal: int = 0
    needed: str = ""  # the same in words

    @property
    def sufficient(self) -> bool:
        return not self.reasons

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sufficient": self.sufficient}


def assess(
    *,
    malignant: int,
    normal: int,
    reference_auroc: float,
    reference_ci_low: float,
    resamples: int,
    resamples_used: int,
    margin: float,
    confidence: float,
    min_per_class: int | None = None,
) -> Evidence:
    """Apply the three rules of the module docstring."""
    power_minimum = minimum_per_class(margin, confidence)
    minimum = power_minimum if min_per_class is None else min_per_class
    source = (
        "power calculation"
        if min_per_class is None
        else f"given (--min-per-class {min_per_class}; the power calculation says {power_minimum})"
    )
    reasons: list[str] = []
    target = 0
    if min(malignant, normal) < minimum:
        reasons.append(
            f"too few breasts: {malignant} malignant and {normal} normal, below the minimum of "
            f"{minimum} per class ({source})"
        )
        target = minimum
    skipped = resamples - resamples_used
    if resamples_used == 0 or skipped > MAX_SKIPPED * resamples:
        reasons.append(
            f"the bootstrap could not resample both classes: {skipped} of {resamples} resamples "
            "held one class only"
        )
    words: list[str] = []
    if not math.isfinite(reference_ci_low) or reference_ci_low <= CHANCE_FLOOR:
        low = "undefined" if not math.isfinite(reference_ci_low) else f"{reference_ci_low:.3f}"
        reasons.append(
            f"the reference is near chance: CR 1's AUROC {reference_auroc:.3f} has its CI's lower "
            f"end {low}, at or below {CHANCE_FLOOR:g}"
        )
        floor_n = (
            per_class_above_floor(reference_auroc, confidence)
            if math.isfinite(reference_auroc)
            else None
        )
        if floor_n is None:
            words.append(
                f"at AUROC {reference_auroc:.3f} on CR 1 no number of breasts lifts the CI above "
                f"{CHANCE_FLOOR:g}: check that the model suits these images (its card's training "
                "data, the phantom preset, the image geometry)"
            )
        else:
            target = max(target, floor_n)
    more_malignant = max(0, target - malignant)
    more_normal = max(0, target - normal)
    if more_malignant or more_normal:
        words.insert(
            0,
            f"about {more_malignant} more malignant and {more_normal} more normal breasts "
            f"({target} per class)",
        )
    if skipped and not (more_malignant or more_normal) and reasons:
        words.append("more breasts of the smaller class")
    return Evidence(
        min_per_class=minimum,
        min_source=source,
        planning={
            "auroc": PLANNING_AUROC,
            "correlation": PLANNING_CORRELATION,
            "power": PLANNING_POWER,
            "margin": margin,
            "confidence": confidence,
            "power_minimum": power_minimum,
        },
        malignant=malignant,
        normal=normal,
        reference_auroc=reference_auroc,
        reference_ci_low=reference_ci_low,
        chance_floor=CHANCE_FLOOR,
        resamples=resamples,
        resamples_used=resamples_used,
        reasons=reasons,
        more_malignant=more_malignant,
        more_normal=more_normal,
        needed="; ".join(words),
    )
