"""The recommendation: the highest CR whose AUROC is non-inferior to CR 1 within a margin.

A CR is *non-inferior* when the one-sided lower confidence bound (default 95 %) of the paired
bootstrap difference AUROC(CR) - AUROC(1) lies above ``-margin`` (default 0.02).

The recommended CR is the highest tested CR such that **it and every lower tested CR** are
non-inferior. A CR that passes above one that failed is not recommended: compression only
removes information, so a pass above a failure is most likely noise in a small test set (or a
model that behaves oddly), and a policy should not rely on it; such CRs are listed in
``passes_above_failure``. When every CR passes, the recommendation is the highest tested CR
and the safe limit may lie higher; when even the lowest CR above 1 fails there is no
recommendation (keep lossless, or test CRs closer to 1).

Whatever the verdicts say, :func:`withhold` turns the recommendation into the distinct status
``no-recommendation`` when the data cannot carry one (too few breasts, a reference near chance,
a bootstrap that could not resample both classes: :mod:`.evidence`); the verdicts stay for
information.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from services.core.policies import load_presets

Status = Literal["all-pass", "partial", "none-pass", "no-lossy", "no-recommendation"]


@dataclass(frozen=True)
class Verdict:
    cr: float
    delta: float  # AUROC(CR) - AUROC(1)
    lower_bound: float  # one-sided lower confidence bound of the difference
    non_inferior: bool


@dataclass(frozen=True)
class Recommendation:
    cr: float | None  # None: not even the lowest CR above 1 is non-inferior
    status: Status
    first_failure: float | None
    passes_above_failure: list[float]
    margin: float
    confidence: float
    verdicts: list[Verdict]
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GuidelineCheck:
    """A guideline preset's maximum CR for the modality, next to what the study found."""

    preset: str
    max_cr: float
    note: str
    tested: bool
    non_inferior: bool | None  # the verdict at exactly that CR, when it was tested
    within_recommendation: bool | None  # max_cr <= the recommended CR (None: no recommendation)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def recommend(
    crs: Sequence[float],
    deltas: Sequence[float],
    lower_bounds: Sequence[float],
    *,
    margin: float,
    confidence: float = 0.95,
) -> Recommendation:
    """Verdicts per CR (CR 1 excluded) and the recommendation (see the module docstring)."""
    if not len(crs) == len(deltas) == len(lower_bounds):
        raise ValueError("crs, deltas and lower_bounds differ in length")
    rows = sorted(
        (float(c), float(d), float(b))
        for c, d, b in zip(crs, deltas, lower_bounds, strict=True)
        if c != 1
    )
    verdicts = [Verdict(c, d, b, b > -margin) for c, d, b in rows]
    side = f"{confidence:.0%} one-sided"
    if not verdicts:
        return Recommendation(
            None,
            "no-lossy",
            None,
            [],
            margin,
            confidence,
            [],
            "only CR 1 was tested: there is nothing to compare with it",
        )
    first_fail = next((v for v in verdicts if not v.non_inferior), None)
    if first_fail is None:
        top = verdicts[-1].cr
        message = (
            f"every tested CR up to {top:g} is non-inferior to CR 1 (AUROC margin {margin:g}, "
            f"{side}): CR {top:g}, the highest tested, is recommended; the limit may lie "
            "higher: test larger CRs to find it"
        )
        return Recommendation(top, "all-pass", None, [], margin, confidence, verdicts, message)
    passing = [v.cr for v in verdicts if v.cr < first_fail.cr]
    above = [v.cr for v in verdicts if v.cr > first_fail.cr and v.non_inferior]
    failed = (
        f"CR {first_fail.cr:g} is not (AUROC change {first_fail.delta:+.3f}, lower bound "
        f"{first_fail.lower_bound:+.3f} <= -{margin:g})"
    )
    if passing:
        best = passing[-1]
        message = (
            f"CR {best:g} is recommended: it and every lower tested CR are non-inferior to CR 1 "
            f"(AUROC margin {margin:g}, {side}); {failed}"
        )
        status: Status = "partial"
    else:
        best = None
        message = (
            f"no CR is recommended: even the lowest tested CR above 1 fails: {failed}; keep "
            f"lossless (CR 1) for this model or test CRs between 1 and {first_fail.cr:g}"
        )
        status = "none-pass"
    if above:
        message += (
            f"; CR {', '.join(f'{c:g}' for c in above)} pass again above the failure but are not "
            "recommended (a lower CR failed: likely noise in the test set)"
        )
    return Recommendation(best, status, first_fail.cr, above, margin, confidence, verdicts, message)


def withhold(rec: Recommendation, reasons: list[str], needed: str) -> Recommendation:
    """``rec`` as ``no-recommendation``: the data cannot carry a verdict (:mod:`.evidence`)."""
    if not reasons:
        return rec
    message = "; ".join(reasons)
    if needed:
        message += f"; needed: {needed}"
    message += "; the per-CR verdicts are shown for information only"
    return replace(rec, cr=None, status="no-recommendation", message=message)


def guideline_checks(recommendation: Recommendation, modality: str = "MG") -> list[GuidelineCheck]:
    """The shipped guideline presets' maxima for ``modality`` (MG: CAR 25, DRG 15, RCR 20)."""
    verdicts = {v.cr: v for v in recommendation.verdicts}
    out = []
    for preset in load_presets().values():
        rows = [r for r in preset.rows if modality in r.modalities]
        if not rows:
            continue
        row = min(rows, key=lambda r: r.max_cr)
        verdict = verdicts.get(row.max_cr)
        best = recommendation.cr
        if best is None and recommendation.status == "none-pass":
            best = 1.0  # nothing above CR 1 is safe: every preset lies beyond
        out.append(
            GuidelineCheck(
                preset=preset.name,
                max_cr=row.max_cr,
                note=row.note,
                tested=verdict is not None,
                non_inferior=None if verdict is None else verdict.non_inferior,
                within_recommendation=None if best is None else row.max_cr <= best,
            )
        )
    return sorted(out, key=lambda g: (g.max_cr, g.preset))
