"""``crgate experiment``: the seed study's three training experiments, one command each
(services/lab/training/experiments.py, docs/cr-study.md "Training experiments")."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from services.cli.common import cr_list, fail, out, progress
from services.core.errors import CrgateError, InvalidParameter
from services.core.ratio import STUDY_CRS_TEXT


def experiment(
    name: Annotated[
        str,
        typer.Argument(
            help="same-cr (train and test on each CR), matrix (train x test CR) or "
            "augmentation (trained on CR ranges 1-15 ... 1-11K, tested on every CR)."
        ),
    ],
    data_dir: Annotated[Path, typer.Option("--data-dir", help="A `crgate synth` folder.")],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Experiments folder: models/ (shared) and a report each.")
    ] = Path("var/experiments"),
    arch: Annotated[
        str, typer.Option(help="Architectures, comma-separated: cnn3, resnet18.")
    ] = "cnn3",
    crs: Annotated[str, typer.Option(help="The CRs (training CRs and test CRs).")] = STUDY_CRS_TEXT,
    steps: Annotated[
        int, typer.Option(help="Optimisation steps per model (epochs follow from it).", min=1)
    ] = 600,
    lossy_copies: Annotated[
        int,
        typer.Option(
            help="augmentation: compressed copies per breast drawn from the range "
            "(0 = one at every CR of the range).",
            min=0,
        ),
    ] = 1,
    batch_size: Annotated[int, typer.Option(min=2)] = 32,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Split, initialisation and bootstrap seed.")] = 0,
    cache_dir: Annotated[
        Path, typer.Option(help="Compressed-copy cache, shared with `crgate train`.")
    ] = Path("var/cache/compressed"),
    workers: Annotated[int, typer.Option(help="Processes (0: every core).", min=0)] = 0,
    threads: Annotated[int, typer.Option(help="Torch threads (0: every core).", min=0)] = 0,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for CIs.", min=10)] = 1000,
) -> None:
    """Run one of the seed study's training experiments on phantoms.

    Models are kept in OUT/models and shared across the experiments (matrix reuses same-cr's,
    augmentation reuses M-CR1); a rerun trains and tests only what is missing. The report goes
    to OUT/NAME: results.json, CSV tables, PNG plots and report.html.
    """
    try:
        crs_given = cr_list(crs, "--crs")
        archs = tuple(a.strip() for a in arch.split(",") if a.strip())
        if not archs:
            raise InvalidParameter("--arch is empty: give cnn3, resnet18 or both")
        from services.lab.training.experiments import ExperimentConfig, plan

        plan(name, archs, crs_given)  # checks the name, the architectures and the CRs
    except ImportError as exc:
        raise fail(
            f"experiments need torch ({exc}): pip install -e '.[train]' (torch==2.13.0 on CPU)", 4
        ) from None
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    from services.lab.training.experiment_report import write_report
    from services.lab.training.experiments import run_experiment

    config = ExperimentConfig(
        data_dir=data_dir,
        out_dir=out_dir,
        archs=archs,
        crs=tuple(sorted(dict.fromkeys(crs_given))),
        steps=steps,
        lossy_copies=lossy_copies,
        batch_size=batch_size,
        learning_rate=lr,
        seed=seed,
        cache_dir=cache_dir,
        workers=workers,
        threads=threads,
        bootstrap=bootstrap,
    )
    with progress() as bar:
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int) -> None:
            kind = stage.split(":")[0] if ": models" not in stage else "models"
            kind = "fit" if stage.endswith("fitting") else kind
            if kind not in tasks:
                tasks[kind] = bar.add_task(stage, total=total)
            bar.update(tasks[kind], description=stage, completed=done, total=total)

        try:
            run = run_experiment(name, config, report)
            folder = write_report(run)
        except CrgateError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except ValueError as exc:
            raise fail(str(exc), 2) from None
    trained = sum(o.trained_now for o in run.outcomes)
    out.print(
        f"{name}: {len(run.outcomes)} model(s), {trained} trained now, "
        f"{len(run.outcomes) - trained} reused; {run.seconds:.0f} s",
        markup=False,
        highlight=False,
    )
    for o in run.outcomes:
        cells = "  ".join(f"{cr:g}: {r.auroc.value:.3f}" for cr, r in o.results.items())
        out.print(
            f"{o.spec.arch} {o.spec.label}: AUROC {cells}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    out.print(f"report: {folder / 'report.html'}", markup=False, highlight=False)
