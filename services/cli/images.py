"""``crgate transcode | inspect | synth``: DICOM files in, JPEG 2000 copies and their cost,
what crgate sees in a file, and synthetic phantom studies out.

Errors end as one line naming the file and the reason, with a non-zero exit code; batches go on
with the other files and summarise failures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from services.cli.common import err, expand, fail, out, progress, read_json_object
from services.core.codecs import SYNTAX_HELP, OutputSyntax
from services.core.config import get_settings
from services.core.errors import CrgateError, InvalidParameter
from services.core.ratio import CompressionRatio, validate_cr


def transcode(
    inputs: Annotated[
        list[Path], typer.Argument(help="DICOM files, or folders to walk recursively.")
    ],
    cr: Annotated[str, typer.Option("--cr", help="Target compression ratio; 1 = lossless.")] = "25",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Output file (one input only).")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Output folder; files are named <SOP Instance UID>.dcm."),
    ] = None,
    syntax: Annotated[
        OutputSyntax | None,
        typer.Option(help=SYNTAX_HELP),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    threads: Annotated[
        int | None, typer.Option(help="OpenJPEG threads (default: every core).", min=0)
    ] = None,
) -> None:
    """Transcode DICOM images to JPEG 2000 or HTJ2K at a target compression ratio and measure
    the cost."""

    try:
        ratio = validate_cr(cr)
        chosen = OutputSyntax.for_cr(ratio, syntax)
    except InvalidParameter as exc:
        raise fail(str(exc)) from None
    files, skipped = expand(inputs)
    if skipped:
        err.print(f"note: skipped {skipped} non-DICOM file(s) in the input folder(s)")
    if not files:
        raise fail("no DICOM input files")
    if output is not None and (len(files) != 1 or out_dir is not None):
        raise fail("-o/--output takes exactly one input file and no --out-dir")
    target_dir = out_dir or Path("crgate-out")
    if output is None:
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise fail(f"{target_dir}: cannot create output folder ({exc.strerror})", 5) from None
    n_threads = get_settings().threads if threads is None else threads

    results: list[dict[str, Any]] = []
    failures: list[tuple[Path, CrgateError]] = []
    written: dict[Path, Path] = {}  # this batch's outputs: none overwrites another
    with progress(len(files) > 1 and not as_json) as bar:
        task = bar.add_task("transcoding", total=len(files))
        for path in files:
            try:
                result = _transcode_one(path, output, target_dir, ratio, chosen, n_threads, written)
            except CrgateError as exc:
                failures.append((path, exc))
                err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
                if as_json:
                    print(json.dumps({"source": str(path), "error": str(exc)}), flush=True)
            else:
                results.append(result)
                if as_json:
                    print(json.dumps(result), flush=True)
                elif result["note"]:
                    err.print(
                        f"note: {path}: {result['note']}",
                        markup=False,
                        highlight=False,
                        soft_wrap=True,
                    )
            bar.advance(task)

    if not as_json and results:
        _print_results(results)
    if failures:
        err.print(
            f"{len(failures)} of {len(files)} file(s) failed: "
            + ", ".join(str(p) for p, _ in failures),
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(failures[0][1].exit_code)


def _transcode_one(
    path: Path,
    output: Path | None,
    target_dir: Path,
    cr: CompressionRatio,
    syntax: OutputSyntax,
    threads: int,
    written: dict[Path, Path],
) -> dict[str, Any]:
    from services.core.pipeline import transcode_file

    out_dir = None if output is not None else target_dir
    result = transcode_file(
        path, output, cr=cr, out_dir=out_dir, syntax=syntax, threads=threads, batch=written
    )
    return result.as_dict()


_COLUMNS = (
    "file",
    "input SOP UID",
    "output SOP UID",
    "target CR",
    "achieved CR",
    "PSNR dB",
    "SSIM",
    "max err",
    "bytes in",
    "bytes out",
    "ms",
)


def _result_cells(r: dict[str, Any]) -> list[str]:
    ssim = "-" if r["ssim"] is None else f"{r['ssim']:.5f}"
    return [
        Path(r["source"]).name,
        r["input_sop_instance_uid"],
        r["output_sop_instance_uid"],
        "lossless" if r["lossless"] else f"{r['target_cr']:g}",
        f"{r['achieved_cr']:.2f}" + ("" if r["reached"] else " (not reached)"),
        f"{r['psnr_db']:.2f}",
        ssim,
        str(r["max_abs_error"]),
        str(r["bytes_in"]),
        str(r["bytes_out"]),
        f"{r['total_ms']:.0f}",
    ]


def _table(columns: tuple[str, ...], rows: list[list[str]], title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    for name in columns:
        table.add_column(name, no_wrap=True)
    for cells in rows:
        table.add_row(*(Text(c) for c in cells))
    return table


def _width(columns: tuple[str, ...], rows: list[list[str]]) -> int:
    return sum(max(len(c) for c in col) + 3 for col in zip(columns, *rows, strict=True)) + 1


def _print_results(results: list[dict[str, Any]]) -> None:
    """One row per file; a narrower terminal gets the UIDs in a table of their own, and one
    too narrow for that gets a small table per file."""
    rows = [_result_cells(r) for r in results]
    if _width(_COLUMNS, rows) <= out.width:
        out.print(_table(_COLUMNS, rows, "crgate transcode"))
        return
    uid_columns = _COLUMNS[:3]
    metric_columns = (_COLUMNS[0], *_COLUMNS[3:])
    metric_rows = [[cells[0], *cells[3:]] for cells in rows]
    uid_rows = [cells[:3] for cells in rows]
    if max(_width(metric_columns, metric_rows), _width(uid_columns, uid_rows)) <= out.width:
        out.print(_table(metric_columns, metric_rows, "crgate transcode"))
        out.print(_table(uid_columns, uid_rows))
        return
    for cells in rows:
        record = Table(show_header=False, title=Text(cells[0]), title_justify="left")
        record.add_column("field", no_wrap=True)
        record.add_column("value", overflow="fold")
        for name, cell in zip(_COLUMNS[1:], cells[1:], strict=True):
            record.add_row(name, Text(cell))
        out.print(record)


def inspect(
    file: Annotated[Path, typer.Argument(help="A DICOM file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show what crgate sees in a file: modality, geometry, bits, syntax, lossy history."""
    from services.core.dicom.io import read_dataset
    from services.core.dicom.pixels import describe

    try:
        info = describe(read_dataset(file), str(file))
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    if as_json:
        print(json.dumps(info))
        return
    table = Table(show_header=False, title=Text(str(file)), title_justify="left")
    table.add_column("attribute", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in info.items():
        shown = "-" if value is None else (", ".join(value) if isinstance(value, list) else value)
        table.add_row(key, Text(str(shown)))
    out.print(table)
    if info.get("problem"):
        raise fail(str(info["problem"]), 2)


def synth(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Folder to write studies into.")],
    studies: Annotated[int, typer.Option("--studies", help="Number of studies.")] = 1,
    malignant_fraction: Annotated[
        float, typer.Option(help="Fraction of breasts with a malignant lesion.")
    ] = 0.5,
    size: Annotated[
        str, typer.Option(help="View size WxH in pixels (seed study: 3328x4096).")
    ] = "3328x4096",
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same studies).")] = 0,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="JSON object of PhantomConfig fields to override (lesion sizes, contrasts...).",
        ),
    ] = None,
) -> None:
    """Generate synthetic four-view mammography studies (DICOM) with ground truth (truth.csv).

    The folder also gets phantom.json: the configuration, seed and fractions used.
    """
    from dataclasses import asdict

    from services.lab import phantom

    if studies < 1:
        raise fail(f"--studies {studies}: give at least 1 study")
    try:
        width, height = phantom.parse_size(size)
        overrides = read_json_object(config_file) if config_file else {}
        config = phantom.PhantomConfig.from_overrides(overrides, width=width, height=height)
        out_dir.mkdir(parents=True, exist_ok=True)
        with progress(studies > 1) as bar:
            task = bar.add_task("synthesising studies", total=studies)
            rows = phantom.write_studies(
                out_dir,
                studies,
                seed=seed,
                config=config,
                malignant_fraction=malignant_fraction,
                on_study=lambda _i: bar.advance(task),
            )
        record = {
            "config": asdict(config),
            "seed": seed,
            "studies": studies,
            "malignant_fraction": malignant_fraction,
        }
        (out_dir / "phantom.json").write_text(json.dumps(record, indent=2) + "\n")
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    except OSError as exc:
        raise fail(f"{out_dir}: cannot write ({exc.strerror or exc})", 5) from None
    labels: dict[str, int] = {}
    for row in rows:
        if row.view == "CC":
            labels[row.label] = labels.get(row.label, 0) + 1
    summary = ", ".join(f"{n} {label}" for label, n in sorted(labels.items()))
    out.print(
        f"wrote {studies} stud{'y' if studies == 1 else 'ies'} ({len(rows)} images; breasts: "
        f"{summary}) to {out_dir}; ground truth in {out_dir / 'truth.csv'}",
        highlight=False,
        markup=False,
    )
