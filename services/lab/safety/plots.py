"""The report's figures as PNG (matplotlib's object API with the Agg canvas: no global state,
no display needed)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from services.core.dicom.io import atomic_output
from services.lab.safety.analysis import StudyResult
from services.lab.safety.paired import pr_points, roc_points
from services.lab.safety.panel import SaliencyPanel

DPI = 110
PASS, FAIL, REF = "#1a9850", "#d73027", "#4575b4"


def cr_label(cr: float) -> str:
    """1, 15, 500, 1K, 5K, 11K."""
    if cr >= 1000 and cr % 1000 == 0:
        return f"{cr / 1000:g}K"
    return f"{cr:g}"


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    with atomic_output(path) as fh:
        fh.write(buffer.getvalue())


def _colours(n: int) -> list[Any]:
    cmap = colormaps["viridis"]
    return [cmap(v) for v in np.linspace(0.0, 0.9, max(n, 1))]


def roc_plot(result: StudyResult, path: Path) -> None:
    fig = Figure(figsize=(6.4, 5.6))
    ax = fig.add_subplot()
    for k, (cr, colour) in enumerate(zip(result.crs, _colours(len(result.crs)), strict=True)):
        fpr, tpr = roc_points(result.labels, result.probabilities[k])
        e = result.per_cr[k].auroc
        reference = cr == 1
        ax.plot(
            fpr,
            tpr,
            color="black" if reference else colour,
            lw=1.4,
            ls="--" if reference else "-",
            zorder=3 if reference else 2,
            label=f"CR {cr_label(cr)}: {e.value:.3f} [{e.ci_low:.3f}, {e.ci_high:.3f}]",
        )
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":")
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title="ROC per CR (AUROC, 95 % CI)",
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def pr_plot(result: StudyResult, path: Path) -> None:
    fig = Figure(figsize=(6.4, 5.6))
    ax = fig.add_subplot()
    for k, (cr, colour) in enumerate(zip(result.crs, _colours(len(result.crs)), strict=True)):
        recall, precision = pr_points(result.labels, result.probabilities[k])
        e = result.per_cr[k].auprc
        reference = cr == 1
        ax.step(
            recall,
            precision,
            where="pre",
            color="black" if reference else colour,
            lw=1.4,
            ls="--" if reference else "-",
            zorder=3 if reference else 2,
            label=f"CR {cr_label(cr)}: {e.value:.3f} [{e.ci_low:.3f}, {e.ci_high:.3f}]",
        )
    prevalence = float(np.mean(result.labels))
    ax.axhline(prevalence, color="0.6", lw=0.8, ls=":")
    ax.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title="Precision-recall per CR (AUPRC, 95 % CI)",
    )
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    _save(fig, path)


def _cr_axis(ax: Axes, crs: Sequence[float]) -> None:
    ax.set_xscale("log")
    labels: list[str] = []
    shown = -1  # index of the last tick that carries a label
    for i, cr in enumerate(crs):
        if shown >= 0 and np.log10(cr / crs[shown]) < 0.08:  # too close (10K, 11K): merge
            labels[shown] += f",{cr_label(cr)}"
            labels.append("")
        else:
            labels.append(cr_label(cr))
            shown = i
    ax.set_xticks(list(crs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("target compression ratio")


def auroc_plot(result: StudyResult, path: Path) -> None:
    """AUROC with its CI band; below, the paired difference to CR 1 with the margin."""
    crs = np.array(result.crs)
    fig = Figure(figsize=(7.6, 7.0))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    roc = [s.auroc for s in result.per_cr]
    top.fill_between(
        crs,
        [e.ci_low for e in roc],
        [e.ci_high for e in roc],
        color=REF,
        alpha=0.2,
        label="95 % CI (bootstrap over breasts)",
    )
    top.plot(crs, [e.value for e in roc], "o-", color=REF, label="AUROC")
    margin = result.recommendation.margin
    ref = roc[result.crs.index(1.0)].value
    top.axhline(ref - margin, color="0.4", ls="--", lw=0.9, label=f"AUROC(CR 1) - {margin:g}")
    rec = result.recommendation.cr
    for ax in (top, bottom):
        for g in result.guidelines:
            ax.axvline(g.max_cr, color="#984ea3", ls=":", lw=1.0)
        if rec is not None:
            ax.axvline(rec, color=PASS, lw=2.0, alpha=0.6)
    ymax = top.get_ylim()[1]
    for g in result.guidelines:
        top.text(
            g.max_cr,
            ymax,
            f" {g.preset} {g.max_cr:g}",
            rotation=90,
            va="top",
            fontsize=7,
            color="#984ea3",
        )
    top.set(
        ylabel="AUROC",
        title=f"AUROC vs CR: {result.recommendation.status}; recommended "
        + ("none" if rec is None else f"CR {cr_label(rec)}"),
    )
    top.legend(fontsize=7, loc="lower left")
    deltas = [s.auroc_delta for s in result.per_cr]
    colours = [
        REF if s.non_inferior is None else PASS if s.non_inferior else FAIL for s in result.per_cr
    ]
    values = np.array([d.value for d in deltas])
    bottom.errorbar(
        crs,
        values,
        yerr=[values - [d.ci_low for d in deltas], [d.ci_high for d in deltas] - values],
        fmt="none",
        ecolor="0.5",
        capsize=3,
        lw=1,
    )
    bottom.scatter(crs, values, c=colours, zorder=3, s=28)
    bottom.scatter(
        crs,
        [d.lower_bound for d in deltas],
        marker="^",
        c=colours,
        s=22,
        zorder=3,
        label=f"one-sided {result.recommendation.confidence:.0%} lower bound",
    )
    bottom.axhline(-margin, color="0.4", ls="--", lw=0.9, label=f"-margin ({margin:g})")
    bottom.axhline(0, color="0.7", lw=0.8)
    bottom.set(ylabel="AUROC(CR) - AUROC(1)")
    bottom.legend(fontsize=7, loc="lower left")
    _cr_axis(bottom, result.crs)
    fig.tight_layout()
    _save(fig, path)


def quality_plot(result: StudyResult, path: Path) -> None:
    """PSNR and SSIM per CR: median, interquartile band, min-max band."""
    crs = np.array(result.crs)
    fig = Figure(figsize=(7.6, 6.4))
    axes = fig.subplots(2, 1, sharex=True)
    for ax, key, label in ((axes[0], "psnr_db", "PSNR (dB)"), (axes[1], "ssim", "SSIM")):
        stats = [getattr(s, key) for s in result.per_cr]
        keep = [i for i, d in enumerate(stats) if d["median"] is not None]
        x = crs[keep]
        get = [[stats[i][f] for i in keep] for f in ("min", "q25", "median", "q75", "max")]
        ax.fill_between(x, get[0], get[4], color=REF, alpha=0.12, label="min-max")
        ax.fill_between(x, get[1], get[3], color=REF, alpha=0.3, label="interquartile range")
        ax.plot(x, get[2], "o-", color=REF, label="median over views")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[0].set_title("Image quality of the compressed copies (CR 1: original, 100 dB)")
    _cr_axis(axes[1], result.crs)
    fig.tight_layout()
    _save(fig, path)


def panel_plot(panel: SaliencyPanel, path: Path) -> None:
    n = len(panel.tiles) + 1
    fig = Figure(figsize=(2.6 * n, 3.9))
    axes = fig.subplots(1, n)
    b = panel.breast
    truth = f" ({b.kind})" if b.kind else ""
    axes[0].imshow(np.asarray(panel.original))
    axes[0].set_title(
        f"original{truth}\nground truth circled" if b.lesions else "original", fontsize=8
    )
    for ax, tile in zip(axes[1:], panel.tiles, strict=True):
        ax.imshow(np.asarray(tile.image))
        q = tile.quality
        ax.set_title(
            f"CR {cr_label(tile.cr)} (PSNR {q.psnr_db:.0f} dB)\n"
            f"achieved {q.achieved_cr:.0f}, p = {tile.probability:.2f}",
            fontsize=8,
        )
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(
        f"{panel.method} saliency, {b.laterality}{panel.view} of study {b.study_uid}", fontsize=8
    )
    fig.tight_layout()
    _save(fig, path)
