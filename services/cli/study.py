"""``crgate study``: the CR safety study from the command line (docs/cr-study.md).

Errors end as one ``error:`` line with the exit code of services/core/errors.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from services.cli.common import err, fail, out, progress
from services.core.config import get_settings
from services.core.errors import CrgateError
from services.core.ratio import STUDY_CRS_TEXT


def study(
    data: Annotated[
        Path,
        typer.Option(
            "--data", help="Folder of DICOM mammograms (a `crgate synth` folder has truth.csv)."
        ),
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Report folder (made if missing).")],
    labels: Annotated[
        Path | None,
        typer.Option(
            help="CSV of per-breast labels: study_uid, laterality, label (default: DATA/truth.csv)."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model name in the models folder, a card .json or an .onnx with its card."
        ),
    ] = None,
    crs: Annotated[
        str, typer.Option(help="CRs to test; 1 (the reference) is added.")
    ] = STUDY_CRS_TEXT,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples over breasts.")] = 1000,
    margin: Annotated[
        float, typer.Option(help="Non-inferiority margin on AUROC (one-sided 95 %).")
    ] = 0.02,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Decision threshold for flips (default: the card's operating threshold)."
        ),
    ] = None,
    encoder: Annotated[
        str, typer.Option(help="quick (the training pipeline's) or gateway (the service's).")
    ] = "quick",
    cache_dir: Annotated[
        Path, typer.Option(help="Compressed-copy cache, shared across runs.")
    ] = Path("var/cache/study"),
    workers: Annotated[int, typer.Option(help="Processes (0: every core).")] = 0,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    min_per_class: Annotated[
        int | None,
        typer.Option(
            help="Breasts per class below which no CR is recommended (default: the power "
            "calculation's for the margin, docs/cr-study.md; the report shows an override)."
        ),
    ] = None,
) -> None:
    """Measure how compression changes a model's AUROC and recommend the highest safe CR.

    Every labelled breast is classified at every CR; copies are cached, and a rerun into the same
    --out skips finished CRs.

    The report folder gets results.json, CSV tables, PNG plots and report.html.
    """
    from services.lab.safety.run import run_safety_study
    from services.lab.safety.sweep import SafetyStudyConfig, parse_crs

    settings = get_settings()
    try:
        cr_list, notes = parse_crs(crs)
        config = SafetyStudyConfig(
            crs=cr_list,
            bootstrap=bootstrap,
            margin=margin,
            threshold=threshold,
            encoder=encoder,
            workers=workers,
            seed=seed,
            notes=tuple(notes),
            min_per_class=min_per_class,
        )
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    for note in notes:
        err.print(f"note: {note}", markup=False, highlight=False)
    with progress() as bar:
        task = bar.add_task("classifying", total=None)

        def report(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        try:
            run = run_safety_study(
                data,
                labels,
                model or settings.default_model,
                settings.models_dir,
                config,
                out_dir,
                cache_dir,
                report,
            )
        except CrgateError as exc:
            raise fail(str(exc), exc.exit_code) from None
    sweep = run.sweep
    rec = run.result.recommendation
    card = run.result.meta["model"]
    out.print(
        f"model {card['name']} {card['version']}: intended use: {card['intended_use']}"
        + (f"; trained on: {card['training_data']}" if card["training_data"] else ""),
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if card["not_for_clinical_use"]:
        out.print("NOT FOR CLINICAL USE (the model card says so)", markup=False, highlight=False)
    if sweep.reused:
        out.print(
            f"reused {len(sweep.reused)} finished CR(s) from {out_dir}: "
            + ", ".join(f"{c:g}" for c in sweep.reused),
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    out.print(
        f"{len(sweep.computed)} CR(s) computed; compressed copies: {sweep.cache_hits} from the "
        f"cache, {sweep.cache_misses} made",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    for s in run.result.per_cr:
        verdict = "" if s.non_inferior is None else ("  ok" if s.non_inferior else "  FAILS")
        out.print(
            f"CR {s.cr:>7g}: AUROC {s.auroc.value:.3f} "
            f"[{s.auroc.ci_low:.3f}, {s.auroc.ci_high:.3f}]"
            f"  delta {s.auroc_delta.value:+.3f} (lower {s.auroc_delta.lower_bound:+.3f})"
            f"  flips {s.flips}{verdict}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    presets = ", ".join(f"{g.preset} {g.max_cr:g}" for g in run.result.guidelines)
    label = "NO RECOMMENDATION" if rec.status == "no-recommendation" else "recommendation"
    out.print(
        f"{label}: {rec.message} (guideline presets: {presets})",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    out.print(f"report: {out_dir / 'report.html'}", markup=False, highlight=False)
