"""From per-CR probabilities to the study's numbers: paired-bootstrap AUROC/AUPRC per CR, their
differences to CR 1, quality distributions, probability changes, decision flips, and the
recommendation next to the guideline presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from services.core.stats import Estimate
from services.lab.safety.copies import REACHED_TOLERANCE
from services.lab.safety.evidence import Evidence, assess
from services.lab.safety.labels import LabelledSet
from services.lab.safety.paired import Difference, describe, paired_bootstrap
from services.lab.safety.recommend import (
    GuidelineCheck,
    Recommendation,
    guideline_checks,
    recommend,
    withhold,
)
from services.lab.safety.sweep import CrResult, SafetyStudyConfig

MODALITY = "MG"


@dataclass(frozen=True)
class CrSummary:
    cr: float
    auroc: Estimate
    auprc: Estimate
    auroc_delta: Difference  # AUROC(CR) - AUROC(1), paired
    auprc_delta: Difference
    non_inferior: bool | None  # None for CR 1
    mean_abs_change: float  # mean |p(CR) - p(1)| over breasts
    flips: int  # breasts whose decision at the threshold differs from CR 1's
    flip_fraction: float
    psnr_db: dict[str, Any]
    ssim: dict[str, Any]
    achieved_cr: dict[str, Any]
    reached_fraction: float  # views whose copy came within 5 % of the target CR (or beyond)
    n_views: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "cr": self.cr,
            "auroc": self.auroc.as_dict(),
            "auprc": self.auprc.as_dict(),
            "auroc_delta": self.auroc_delta.as_dict(),
            "auprc_delta": self.auprc_delta.as_dict(),
            "non_inferior": self.non_inferior,
            "mean_abs_change": self.mean_abs_change,
            "flips": self.flips,
            "flip_fraction": self.flip_fraction,
            "psnr_db": self.psnr_db,
            "ssim": self.ssim,
            "achieved_cr": self.achieved_cr,
            "reached_fraction": self.reached_fraction,
            "n_views": self.n_views,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class StudyResult:
    crs: list[float]
    keys: list[str]  # breast keys "<study>/<L|R>", the columns of ``probabilities``
    labels: npt.NDArray[np.int64]
    probabilities: npt.NDArray[np.float64]  # [CRs, breasts]
    threshold: float
    per_cr: list[CrSummary]
    recommendation: Recommendation
    guidelines: list[GuidelineCheck]
    resamples_used: int
    evidence: Evidence
    meta: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.meta,
            "threshold": self.threshold,
            "bootstrap_resamples_used": self.resamples_used,
            "per_cr": [s.as_dict() for s in self.per_cr],
            "recommendation": self.recommendation.as_dict(),
            "evidence": self.evidence.as_dict(),
            "guidelines": {"modality": MODALITY, "presets": [g.as_dict() for g in self.guidelines]},
        }


def analyse(
    labelled: LabelledSet,
    results: dict[float, CrResult],
    config: SafetyStudyConfig,
    threshold: float,
    meta: dict[str, Any],
) -> StudyResult:
    crs = list(config.crs)
    keys = [b.key for b in labelled.breasts]
    labels = np.array([b.label for b in labelled.breasts], dtype=np.int64)
    probs = np.array([[results[cr].probabilities[k] for k in keys] for cr in crs])
    ref = crs.index(1.0)
    paired = paired_bootstrap(
        labels,
        probs,
        reference=ref,
        resamples=config.bootstrap,
        confidence=config.confidence,
        seed=config.seed,
    )
    rec = recommend(
        crs,
        [d.value for d in paired.auroc_delta],
        [d.lower_bound for d in paired.auroc_delta],
        margin=config.margin,
        confidence=config.confidence,
    )
    evidence = assess(
        malignant=int(labels.sum()),
        normal=int(len(labels) - labels.sum()),
        reference_auroc=paired.auroc[ref].value,
        reference_ci_low=paired.auroc[ref].ci_low,
        resamples=config.bootstrap,
        resamples_used=paired.resamples_used,
        margin=config.margin,
        confidence=config.confidence,
        min_per_class=config.min_per_class,
    )
    rec = withhold(rec, evidence.reasons, evidence.needed)
    verdicts = {v.cr: v.non_inferior for v in rec.verdicts}
    decisions = probs >= threshold
    per_cr = []
    for k, cr in enumerate(crs):
        views = results[cr].views
        flips = int(np.sum(decisions[k] != decisions[ref]))
        per_cr.append(
            CrSummary(
                cr=cr,
                auroc=paired.auroc[k],
                auprc=paired.auprc[k],
                auroc_delta=paired.auroc_delta[k],
                auprc_delta=paired.auprc_delta[k],
                non_inferior=verdicts.get(cr),
                mean_abs_change=float(np.mean(np.abs(probs[k] - probs[ref]))),
                flips=flips,
                flip_fraction=flips / len(keys),
                psnr_db=describe(np.array([v["psnr_db"] for v in views])),
                ssim=describe(
                    np.array([np.nan if v["ssim"] is None else v["ssim"] for v in views])
                ),
                achieved_cr=describe(np.array([v["achieved_cr"] for v in views])),
                reached_fraction=float(
                    np.mean([v["achieved_cr"] >= cr * (1 - REACHED_TOLERANCE) for v in views])
                ),
                n_views=len(views),
                seconds=results[cr].seconds,
            )
        )
    return StudyResult(
        crs=crs,
        keys=keys,
        labels=labels,
        probabilities=probs,
        threshold=threshold,
        per_cr=per_cr,
        recommendation=rec,
        guidelines=guideline_checks(rec, MODALITY),
        resamples_used=paired.resamples_used,
        evidence=evidence,
        meta=meta,
    )
