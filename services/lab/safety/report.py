"""The report folder: results.json, one CSV per table, PNG figures and report.html.

Files (all written atomically, so a reader never sees half a file):

* ``results.json``: settings, model, data, per-CR metrics, recommendation, guideline presets;
* ``metrics.csv``: one row per CR (AUROC, AUPRC, paired differences, flips, quality);
* ``predictions.csv``: one row per breast and CR (probability, decision, flipped vs CR 1);
* ``views.csv``: one row per view and CR (achieved CR, PSNR, SSIM, max error, bytes);
* ``guidelines.csv``: the guideline presets for the modality next to the verdicts;
* ``roc.png``, ``pr.png``, ``auroc_vs_cr.png``, ``psnr_vs_cr.png``, ``saliency.png``;
* ``report.html``: all of it on one page; the images are referenced relatively, so the folder
  can be moved or zipped as a whole.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.core.dicom.io import atomic_output
from services.lab.safety import plots
from services.lab.safety.analysis import StudyResult
from services.lab.safety.panel import SaliencyPanel
from services.lab.safety.sweep import CrResult

RESULTS = "results.json"
FIGURES = {
    "roc": "roc.png",
    "pr": "pr.png",
    "auroc": "auroc_vs_cr.png",
    "quality": "psnr_vs_cr.png",
    "saliency": "saliency.png",
}
TABLES = ("metrics.csv", "predictions.csv", "views.csv", "guidelines.csv")


def _write(path: Path, text: str) -> None:
    with atomic_output(path) as fh:
        fh.write(text.encode())


def _csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else _cell(v) for v in row])
    _write(path, buffer.getvalue())


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def metric_rows(result: StudyResult) -> tuple[list[str], list[list[Any]]]:
    header = [
        "cr",
        "auroc",
        "auroc_ci_low",
        "auroc_ci_high",
        "auprc",
        "auprc_ci_low",
        "auprc_ci_high",
        "auroc_delta",
        "auroc_delta_ci_low",
        "auroc_delta_ci_high",
        "auroc_delta_one_sided_lower",
        "non_inferior",
        "mean_abs_change",
        "flips",
        "flip_fraction",
    ]
    for q in ("psnr_db", "ssim", "achieved_cr"):
        header += [f"{q}_{s}" for s in ("median", "q25", "q75", "min", "max")]
    header += ["reached_fraction", "n_views", "seconds"]
    rows = []
    for s in result.per_cr:
        row: list[Any] = [
            s.cr,
            s.auroc.value,
            s.auroc.ci_low,
            s.auroc.ci_high,
            s.auprc.value,
            s.auprc.ci_low,
            s.auprc.ci_high,
            s.auroc_delta.value,
            s.auroc_delta.ci_low,
            s.auroc_delta.ci_high,
            s.auroc_delta.lower_bound,
            s.non_inferior,
            s.mean_abs_change,
            s.flips,
            s.flip_fraction,
        ]
        for d in (s.psnr_db, s.ssim, s.achieved_cr):
            row += [d[k] for k in ("median", "q25", "q75", "min", "max")]
        row += [s.reached_fraction, s.n_views, s.seconds]
        rows.append(row)
    return header, rows


def write_report(
    result: StudyResult,
    results: dict[float, CrResult],
    panel: SaliencyPanel | None,
    out_dir: Path,
) -> dict[str, str]:
    """Write every file of the report into ``out_dir``; returns name -> file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = metric_rows(result)
    _csv(out_dir / "metrics.csv", header, rows)
    study_lat = [k.rsplit("/", 1) for k in result.keys]
    prediction_rows = []
    ref = result.crs.index(1.0)
    for k, cr in enumerate(result.crs):
        for i, (study, lat) in enumerate(study_lat):
            p = float(result.probabilities[k, i])
            decision = p >= result.threshold
            flipped = decision != (result.probabilities[ref, i] >= result.threshold)
            prediction_rows.append(
                [study, lat, int(result.labels[i]), cr, p, int(decision), int(flipped)]
            )
    _csv(
        out_dir / "predictions.csv",
        ["study_uid", "laterality", "label", "cr", "probability", "decision", "flipped"],
        prediction_rows,
    )
    view_rows = [
        [
            cr,
            v["file"],
            v["view"],
            v["achieved_cr"],
            v["psnr_db"],
            v["ssim"],
            v["max_abs_error"],
            v["bytes_out"],
        ]
        for cr in result.crs
        for v in results[cr].views
    ]
    _csv(
        out_dir / "views.csv",
        ["cr", "file", "view", "achieved_cr", "psnr_db", "ssim", "max_abs_error", "bytes_out"],
        view_rows,
    )
    _csv(
        out_dir / "guidelines.csv",
        ["preset", "max_cr", "tested", "non_inferior", "within_recommendation", "note"],
        [
            [g.preset, g.max_cr, g.tested, g.non_inferior, g.within_recommendation, g.note]
            for g in result.guidelines
        ],
    )
    plots.roc_plot(result, out_dir / FIGURES["roc"])
    plots.pr_plot(result, out_dir / FIGURES["pr"])
    plots.auroc_plot(result, out_dir / FIGURES["auroc"])
    plots.quality_plot(result, out_dir / FIGURES["quality"])
    files = {name: FIGURES[name] for name in ("roc", "pr", "auroc", "quality")}
    if panel is not None:
        plots.panel_plot(panel, out_dir / FIGURES["saliency"])
        files["saliency"] = FIGURES["saliency"]
    files.update({t.removesuffix(".csv"): t for t in TABLES})
    files["results"] = RESULTS
    files["html"] = "report.html"
    data = result.as_dict()
    data["files"] = files
    data["saliency_panel"] = _panel_dict(panel)
    _write(out_dir / RESULTS, json.dumps(_finite(data), indent=2) + "\n")
    _write(out_dir / "report.html", render_html(data))
    return files


def _panel_dict(panel: SaliencyPanel | None) -> dict[str, Any] | None:
    if panel is None:
        return None
    return {
        "breast": panel.breast.key,
        "view": panel.view,
        "method": panel.method,
        "tiles": [
            {"cr": t.cr, "probability": t.probability, **t.quality.as_dict()} for t in panel.tiles
        ],
    }


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------- HTML

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left}
.box{border-left:6px solid #1a9850;background:#f4faf5;padding:.8em 1em;margin:1em 0}
.box.none-pass{border-color:#d73027;background:#fdf3f2}
.box.no-recommendation{border-color:#888;background:#f2f2f2}
.card{border:1px solid #ccc;padding:.5em 1em;margin:1em 0;font-size:14px}
.clinical{color:#b2182b;font-weight:700;text-transform:uppercase}
.pass{color:#1a9850;font-weight:600} .fail{color:#d73027;font-weight:600}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
.note{color:#555;font-size:13px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _ci(d: dict[str, Any]) -> str:
    return f"{_f(d['value'])} [{_f(d['ci_low'])}, {_f(d['ci_high'])}]"


def render_html(data: dict[str, Any]) -> str:
    rec = data["recommendation"]
    settings = data["settings"]
    model = data["model"]
    labelled = data["data"]
    files = data["files"]
    best = rec["cr"]
    evidence = data["evidence"]
    if rec["status"] == "no-recommendation":
        headline = "no recommendation: the data cannot support one"
    elif best is None:
        headline = "no CR is recommended"
    else:
        headline = f"recommended CR: {best:g}"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>crgate CR study: {_e(model['name'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>CR safety study: {_e(model['name'])} {_e(model['version'])}</h1>",
        _card_box(model),
        f"<div class='box {_e(rec['status'])}'><h2>{_e(headline)}</h2>",
        f"<p>{_e(rec['message'])}.</p>",
        "<p class='note'>Rule: the highest tested CR such that it and every lower tested CR are "
        "non-inferior to CR 1: the one-sided "
        f"{rec['confidence']:.0%} lower bound of the paired bootstrap difference AUROC(CR) - "
        f"AUROC(1) lies above -{rec['margin']:g}. A recommendation needs at least "
        f"{evidence['min_per_class']} breasts per class ({_e(evidence['min_source'])}; "
        "docs/cr-study.md), a CR 1 AUROC whose CI stays above "
        f"{evidence['chance_floor']:g}, and bootstrap resamples that hold both classes.</p></div>",
        "<h2>Guideline presets (mammography)</h2>",
        _guideline_table(data["guidelines"]["presets"]),
        "<h2>Per CR</h2>",
        _metric_table(data["per_cr"]),
        f"<p class='note'>Decisions at threshold {data['threshold']:g} "
        f"({_e(settings['threshold_source'])}); flips count breasts whose decision differs from "
        "CR 1's. Quality: median [interquartile range] over views; achieved CR is the file's "
        "uncompressed pixel bytes over the codestream bytes.</p>",
        "<h2>Figures</h2>",
    ]
    for key, caption in (
        (
            "auroc",
            "AUROC vs CR with its 95 % CI band, the guideline presets (dotted) and the "
            "recommended CR (green); below, the paired difference to CR 1 and the margin",
        ),
        ("roc", "ROC curves per CR"),
        ("pr", "Precision-recall curves per CR"),
        ("quality", "PSNR and SSIM of the compressed copies"),
        ("saliency", _panel_caption(data.get("saliency_panel"))),
    ):
        if key in files:
            parts.append(
                f"<figure><img src='{_e(files[key])}' alt='{_e(caption)}'>"
                f"<figcaption class='note'>{_e(caption)}</figcaption></figure>"
            )
    parts += [
        "<h2>Set-up</h2><table>",
        _row("model", f"{model['name']} {model['version']} ({model['card']})"),
        _row("model sha256", model["sha256"]),
        _row("labelled set", f"{labelled['dir']} with labels {labelled['labels']}"),
        _row(
            "breasts",
            f"{labelled['breasts']} ({labelled['malignant']} malignant) in "
            f"{labelled['studies']} studies, {labelled['views']} views",
        ),
        _row("CRs", ", ".join(f"{c:g}" for c in settings["crs"])),
        _row(
            "bootstrap",
            f"{settings['bootstrap']} resamples over breasts, paired across CRs "
            f"({data['bootstrap_resamples_used']} held both classes), seed {settings['seed']}",
        ),
        _row(
            "minimum breasts per class",
            f"{evidence['min_per_class']} ({evidence['min_source']}); this set: "
            f"{evidence['malignant']} malignant, {evidence['normal']} normal",
        ),
        _row("encoder", settings["encoder_tag"]),
        _row(
            "run",
            f"{data['run']['seconds']:.1f} s; CRs computed "
            f"{_crs(data['run']['computed'])}, reused {_crs(data['run']['reused'])}; copies "
            f"from cache {data['run']['cache_hits']}, made {data['run']['cache_misses']}",
        ),
        "</table>",
    ]
    notes = data.get("notes") or []
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    tables = ", ".join(
        f"<a href='{_e(files[k])}'>{_e(files[k])}</a>"
        for k in ("metrics", "predictions", "views", "guidelines", "results")
    )
    parts.append(f"<p class='note'>Tables: {tables}.</p></body></html>\n")
    return "\n".join(parts)


def _card_box(model: dict[str, Any]) -> str:
    """The card's intended use and training data, above everything else."""
    lines = ["<div class='card'>"]
    if model.get("not_for_clinical_use"):
        lines.append("<p class='clinical'>Not for clinical use</p>")
    lines.append(f"<p><b>Intended use</b> (model card): {_e(model.get('intended_use') or '-')}</p>")
    training = model.get("training_data") or "not stated in the card"
    preset = model.get("training_preset")
    if preset:
        training += f" (phantom preset {preset!r})"
    lines.append(f"<p><b>Training data</b> (model card): {_e(training)}</p></div>")
    return "".join(lines)


def _panel_caption(panel: dict[str, Any] | None) -> str:
    if not panel:
        return "Saliency panel"
    crs = ", ".join(plots.cr_label(t["cr"]) for t in panel["tiles"])
    return f"Saliency panel: one malignant case at CR {crs}"


def _crs(values: Sequence[float]) -> str:
    return ", ".join(f"{c:g}" for c in values) or "none"


def _row(name: str, value: Any) -> str:
    return f"<tr><th class='l'>{_e(name)}</th><td class='l'>{_e(value)}</td></tr>"


def _verdict(value: bool | None) -> str:
    if value is None:
        return "-"
    return "<span class='pass'>yes</span>" if value else "<span class='fail'>no</span>"


def _metric_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "<tr><th>CR</th><th>AUROC [95 % CI]</th><th>AUPRC [95 % CI]</th>"
        "<th>AUROC - AUROC(1) [95 % CI]</th><th>one-sided lower</th><th>non-inferior</th>"
        "<th>mean |&Delta;p|</th><th>flips</th><th>PSNR dB</th><th>SSIM</th>"
        "<th>achieved CR</th></tr>"
    )
    body = []
    for r in rows:
        d = r["auroc_delta"]
        body.append(
            "<tr>"
            f"<td>{r['cr']:g}</td><td>{_ci(r['auroc'])}</td><td>{_ci(r['auprc'])}</td>"
            f"<td>{_f(d['value'])} [{_f(d['ci_low'])}, {_f(d['ci_high'])}]</td>"
            f"<td>{_f(d['one_sided_lower'])}</td><td>{_verdict(r['non_inferior'])}</td>"
            f"<td>{_f(r['mean_abs_change'])}</td>"
            f"<td>{r['flips']} ({r['flip_fraction']:.1%})</td>"
            f"<td>{_spread(r['psnr_db'], 1)}</td><td>{_spread(r['ssim'], 3)}</td>"
            f"<td>{_spread(r['achieved_cr'], 0)}</td>"
            "</tr>"
        )
    return "<table>" + head + "".join(body) + "</table>"


def _spread(d: dict[str, Any], digits: int) -> str:
    if d["median"] is None:
        return "-"
    return f"{_f(d['median'], digits)} [{_f(d['q25'], digits)}, {_f(d['q75'], digits)}]"


def _guideline_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "<tr><th class='l'>preset</th><th>max CR</th><th>non-inferior at that CR</th>"
        "<th>within the recommendation</th><th class='l'>source</th></tr>"
    )
    body = [
        f"<tr><td class='l'>{_e(g['preset'])}</td><td>{g['max_cr']:g}</td>"
        f"<td>{_verdict(g['non_inferior']) if g['tested'] else 'not tested'}</td>"
        f"<td>{_verdict(g['within_recommendation'])}</td><td class='l'>{_e(g['note'])}</td></tr>"
        for g in rows
    ]
    return "<table>" + head + "".join(body) + "</table>"
