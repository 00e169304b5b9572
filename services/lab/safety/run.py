"""``run_safety_study``: the labelled set, the model, the sweep, the statistics and the report,
in order.

The sweep's per-CR partial results are written before any statistics, so an interrupted run
(or one whose report failed) loses at most the CR in progress.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.core.errors import CrgateError, OutputError
from services.core.inference.card import ModelCard
from services.lab.safety.analysis import StudyResult, analyse
from services.lab.safety.copies import CopyCache
from services.lab.safety.labels import load_labelled_set
from services.lab.safety.panel import SaliencyPanel, panel_crs, pick_case, saliency_panel
from services.lab.safety.report import write_report
from services.lab.safety.sweep import (
    Progress,
    SafetyStudyConfig,
    SweepOutcome,
    resolve_model,
    run_sweep,
    threshold_of,
)


@dataclass(frozen=True)
class SafetyStudyRun:
    result: StudyResult
    sweep: SweepOutcome
    files: dict[str, str]
    out_dir: Path


NOT_CLINICAL = "not for clinical use"


def card_summary(card: ModelCard) -> dict[str, Any]:
    """What the card says the model is for and was trained on (the report's top lines)."""
    training = card.training.get("data")
    phantom = card.training.get("phantom")
    preset = phantom.get("preset") if isinstance(phantom, dict) else None
    said = f"{card.intended_use} {training or ''}".lower()
    return {
        "intended_use": card.intended_use,
        "training_data": None if training is None else str(training),
        "training_preset": preset,
        "not_for_clinical_use": NOT_CLINICAL in said,
    }


def phantom_preset(data_dir: Path) -> str | None:
    """The preset a `crgate synth` folder was made with (its phantom.json), when it says."""
    try:
        record = json.loads((data_dir / "phantom.json").read_text())
    except (OSError, ValueError):
        return None
    preset = record.get("preset") if isinstance(record, dict) else None
    return preset if isinstance(preset, str) else None


def run_safety_study(
    data_dir: Path,
    labels: Path | None,
    model: str,
    models_dir: Path,
    config: SafetyStudyConfig,
    out_dir: Path,
    cache_dir: Path,
    progress: Progress | None = None,
) -> SafetyStudyRun:
    from services.core.inference.runtime import Classifier

    started = time.perf_counter()
    labelled = load_labelled_set(data_dir, labels)
    card_path = resolve_model(model, models_dir)
    classifier = Classifier.load(card_path)
    threshold, source = threshold_of(classifier.card, config.threshold)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the report folder ({exc.strerror})") from None
    outcome = run_sweep(labelled, classifier, config, out_dir, cache_dir, progress)
    cache = CopyCache(cache_dir, config.encoder)
    notes = [*config.notes, *labelled.notes]
    if labelled.single_view:
        notes.append(
            f"{labelled.single_view} breast(s) have one view, used for both halves of the input"
        )
    card = classifier.card
    summary = card_summary(card)
    preset = phantom_preset(data_dir)
    if preset and summary["training_preset"] and preset != summary["training_preset"]:
        notes.append(
            f"the phantoms are of preset {preset!r} but the model was trained on preset "
            f"{summary['training_preset']!r}: its AUROC here says how it reads lesions it did "
            "not learn"
        )
    meta: dict[str, Any] = {
        "tool": "crgate study",
        "format": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "name": card.name,
            "version": card.version,
            "card": str(card_path),
            "sha256": card.sha256,
            "architecture": card.architecture,
            "saliency": classifier.saliency_method,
            "provider": classifier.provider,
            **summary,
        },
        "data": {
            "dir": str(data_dir),
            "labels": str(labelled.labels_file),
            "breasts": len(labelled.breasts),
            "malignant": labelled.n_malignant,
            "studies": labelled.n_studies,
            "views": labelled.n_views,
            "single_view_breasts": labelled.single_view,
            "phantom_preset": preset,
        },
        "settings": {
            "crs": list(config.crs),
            "bootstrap": config.bootstrap,
            "margin": config.margin,
            "confidence": config.confidence,
            "threshold_source": source,
            "encoder": config.encoder,
            "encoder_tag": cache.tag,
            "seed": config.seed,
            "min_per_class": config.min_per_class,
        },
        "notes": notes,
    }
    result = analyse(labelled, outcome.results, config, threshold, meta)
    panel: SaliencyPanel | None = None
    try:
        case = pick_case(labelled.breasts, list(result.probabilities[result.crs.index(1.0)]))
        panel = saliency_panel(classifier, case, cache, panel_crs(config.crs))
    except CrgateError as exc:
        notes.append(f"no saliency panel: {exc}")
    meta["run"] = {
        "seconds": time.perf_counter() - started,
        "sweep_seconds": outcome.seconds,
        "computed": outcome.computed,
        "reused": outcome.reused,
        "cache_hits": outcome.cache_hits,
        "cache_misses": outcome.cache_misses,
    }
    files = write_report(result, outcome.results, panel, out_dir)
    return SafetyStudyRun(result, outcome, files, out_dir)
