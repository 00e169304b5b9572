"""Report of a training experiment (`crgate experiment`): results.json, one CSV per table, the
plots as PNG and report.html, in ``<out>/<experiment>/``.

- same-cr: ``table1.csv`` (AUROC and AUPRC with 95 % CI per architecture and CR),
  ``auroc_vs_cr.png`` (the study's Fig. 2 as AUROC against CR, one line per architecture) and
  ``saliency.png`` (Fig. 3: M-CR1, M-CR100, M-CR5K, M-CR11K on one malignant case);
- matrix: ``matrix_auroc.csv`` and ``matrix_auprc.csv`` (rows: models by training CR, columns:
  test CR) and ``matrix_auroc.png`` (the train x test heat map, Table 2);
- augmentation: ``augmentation_auroc.csv``/``augmentation_auprc.csv`` (rows: models by training
  range) and ``augmentation.png`` (the study's Fig. 4).
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from services.core.dicom.io import atomic_output
from services.lab.safety.plots import _colours, _cr_axis, _save, cr_label
from services.lab.training.experiments import ExperimentRun, ModelOutcome

FILES = {
    "same-cr": ("table1.csv", "auroc_vs_cr.png"),
    "matrix": ("matrix_auroc.csv", "matrix_auprc.csv", "matrix_auroc.png"),
    "augmentation": ("augmentation_auroc.csv", "augmentation_auprc.csv", "augmentation.png"),
}


def write_report(run: ExperimentRun) -> Path:
    folder = run.config.out_dir / run.experiment
    folder.mkdir(parents=True, exist_ok=True)
    data = as_dict(run)
    if run.experiment == "same-cr":
        _table1(run.outcomes, folder / "table1.csv")
        _auroc_plot(run.outcomes, folder / "auroc_vs_cr.png")
        if run.panel is not None:  # the study's Fig. 3
            with atomic_output(folder / "saliency.png") as fh:
                run.panel.save(fh, format="PNG")
            data["saliency_panel"] = "saliency.png"
    else:
        name = run.experiment
        for metric in ("auroc", "auprc"):
            _grid_csv(run.outcomes, metric, folder / f"{name}_{metric}.csv")
        if name == "matrix":
            _heat_map(run.outcomes, folder / "matrix_auroc.png")
        else:
            _augmentation_plot(run.outcomes, folder / "augmentation.png")
    _write(folder / "results.json", json.dumps(data, indent=1))
    _write(folder / "report.html", render_html(data))
    return folder


def as_dict(run: ExperimentRun) -> dict[str, Any]:
    c = run.config
    return {
        "experiment": run.experiment,
        "data": str(c.data_dir),
        "split": run.split,
        "settings": {
            "archs": list(c.archs),
            "crs": list(c.crs),
            "steps_per_model": c.steps,
            "lossy_copies": c.lossy_copies,
            "batch_size": c.batch_size,
            "learning_rate": c.learning_rate,
            "weight_decay": c.weight_decay,
            "resize_fraction": c.resize_fraction,
            "seed": c.seed,
            "bootstrap": c.bootstrap,
        },
        "run": {
            "seconds": round(run.seconds, 1),
            "models_trained": sum(o.trained_now for o in run.outcomes),
            "models_reused": sum(not o.trained_now for o in run.outcomes),
            "tests_run": sum(len(o.tested_now) for o in run.outcomes),
        },
        "models": [
            {
                "arch": o.spec.arch,
                "label": o.spec.label,
                "train_crs": list(o.spec.train_crs),
                "training_inputs": o.info["training_inputs"],
                "epochs": o.info["epochs"],
                "best_epoch": o.info["best_epoch"],
                "best_val_auroc": o.info["best_val_auroc"],
                "fit_seconds": o.info["fit_seconds"],
                "results": [r.model_dump(mode="json") for r in o.results.values()],
            }
            for o in run.outcomes
        ],
    }


def _write(path: Path, text: str) -> None:
    with atomic_output(path) as fh:
        fh.write(text.encode())


def _csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    _write(path, buffer.getvalue())


def _r(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _table1(outcomes: Sequence[ModelOutcome], path: Path) -> None:
    rows = []
    for o in outcomes:
        for r in o.results.values():
            rows.append(
                [
                    o.spec.arch,
                    o.spec.label,
                    f"{r.cr:g}",
                    *(_r(v) for v in (r.auroc.value, r.auroc.ci_low, r.auroc.ci_high)),
                    *(_r(v) for v in (r.auprc.value, r.auprc.ci_low, r.auprc.ci_high)),
                    _r(r.mean_psnr_db),
                    _r(r.mean_achieved_cr),
                    r.n_breasts,
                ]
            )
    header = ["arch", "model", "cr", "auroc", "auroc_ci_low", "auroc_ci_high", "auprc"]
    header += ["auprc_ci_low", "auprc_ci_high", "mean_psnr_db", "mean_achieved_cr", "n_breasts"]
    _csv(path, header, rows)


def _test_crs(outcomes: Sequence[ModelOutcome]) -> list[float]:
    return sorted({cr for o in outcomes for cr in o.results})


def _grid_csv(outcomes: Sequence[ModelOutcome], metric: str, path: Path) -> None:
    crs = _test_crs(outcomes)
    header = ["arch", "model"] + [f"test_cr_{cr_label(c)}" for c in crs]
    rows = []
    for o in outcomes:
        values = [getattr(o.results[c], metric) if c in o.results else None for c in crs]
        rows.append(
            [o.spec.arch, o.spec.label]
            + [f"{v.value:.4f} [{v.ci_low:.4f}, {v.ci_high:.4f}]" if v else "" for v in values]
        )
    _csv(path, header, rows)


def _auroc_plot(outcomes: Sequence[ModelOutcome], path: Path) -> None:
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    archs = list(dict.fromkeys(o.spec.arch for o in outcomes))
    for arch, colour in zip(archs, _colours(len(archs)), strict=True):
        points = sorted(
            (cr, r) for o in outcomes if o.spec.arch == arch for cr, r in o.results.items()
        )
        crs = np.array([cr for cr, _ in points])
        ax.plot(crs, [r.auroc.value for _, r in points], "o-", color=colour, label=arch)
        ax.fill_between(
            crs,
            [r.auroc.ci_low for _, r in points],
            [r.auroc.ci_high for _, r in points],
            color=colour,
            alpha=0.2,
        )
    _cr_axis(ax, _test_crs(outcomes))
    ax.set_xlabel("compression ratio (trained and tested)")
    ax.set_ylabel("AUROC (95 % CI)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0.3, 1.0)
    ax.legend(fontsize=8)
    ax.set_title("Models trained and tested on one CR", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _heat_map(outcomes: Sequence[ModelOutcome], path: Path) -> None:
    crs = _test_crs(outcomes)
    grid = np.array(
        [[o.results[c].auroc.value if c in o.results else np.nan for c in crs] for o in outcomes]
    )
    fig = Figure(figsize=(1.2 + 0.62 * len(crs), 1.0 + 0.45 * len(outcomes)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.5, vmax=1.0, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(crs)), [cr_label(c) for c in crs], fontsize=7)
    ax.set_yticks(range(len(outcomes)), [_name(o) for o in outcomes], fontsize=7)
    ax.set_xlabel("test CR")
    ax.set_ylabel("model (training CR)")
    fig.colorbar(image, ax=ax, label="AUROC")
    fig.tight_layout()
    _save(fig, path)


def _name(o: ModelOutcome) -> str:
    return o.spec.label if o.spec.arch == "cnn3" else f"{o.spec.label} ({o.spec.arch})"


def _augmentation_plot(outcomes: Sequence[ModelOutcome], path: Path) -> None:
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for o, colour in zip(outcomes, _colours(len(outcomes)), strict=True):
        points = sorted(o.results.items())
        ax.plot(
            [cr for cr, _ in points],
            [r.auroc.value for _, r in points],
            "o-",
            ms=3,
            color=colour,
            label=_name(o),
        )
    _cr_axis(ax, _test_crs(outcomes))
    ax.set_xlabel("test compression ratio")
    ax.set_ylabel("AUROC")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Compression as augmentation: models trained on CR ranges", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def render_html(data: dict[str, Any]) -> str:
    crs = sorted({r["cr"] for m in data["models"] for r in m["results"]})
    head = "".join(f"<th>{html.escape(cr_label(c))}</th>" for c in crs)
    rows = []
    for m in data["models"]:
        by_cr = {r["cr"]: r["auroc"] for r in m["results"]}
        cells = "".join(
            f"<td>{by_cr[c]['value']:.3f}<br><small>[{by_cr[c]['ci_low']:.3f}, "
            f"{by_cr[c]['ci_high']:.3f}]</small></td>"
            if c in by_cr
            else "<td></td>"
            for c in crs
        )
        rows.append(
            f"<tr><th>{html.escape(m['label'])} ({html.escape(m['arch'])})</th>{cells}"
            f"<td>{m['epochs']}</td><td>{m['fit_seconds']:.0f}</td></tr>"
        )
    pictures = [n for n in FILES[data["experiment"]] if n.endswith(".png")]
    pictures += [data["saliency_panel"]] if data.get("saliency_panel") else []
    images = "".join(f'<p><img src="{name}" alt="{name}"></p>' for name in pictures)
    settings = html.escape(json.dumps(data["settings"]))
    return (
        "<!doctype html><meta charset=utf-8>"
        f"<title>crgate experiment {html.escape(data['experiment'])}</title>"
        "<style>body{font-family:sans-serif;max-width:70em}td,th{padding:2px 6px;"
        "border-bottom:1px solid #ddd;font-size:90%}</style>"
        f"<h1>Experiment: {html.escape(data['experiment'])}</h1>"
        "<p>Synthetic phantoms; not for clinical use. AUROC with 95 % bootstrap CI over test "
        f"breasts. Split {html.escape(json.dumps(data['split']))}; settings {settings}.</p>"
        f"<table><tr><th>model</th>{head}<th>epochs</th><th>fit s</th></tr>{''.join(rows)}"
        f"</table>{images}"
    )
