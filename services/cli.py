"""The ``crgate`` command line (typer). Errors end as one line naming the file and the reason,
with a non-zero exit code; batches go on with the other files and summarise failures."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from services.core.codecs import OutputSyntax
from services.core.config import get_settings
from services.core.errors import CrgateError, InvalidParameter, OutputError
from services.core.ratio import CompressionRatio, validate_cr

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from services.core.pipeline import Classification

app = typer.Typer(
    name="crgate",
    help="JPEG 2000 compression-and-inference gateway for radiology.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _is_part10(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _expand(inputs: Iterable[Path]) -> tuple[list[Path], int]:
    """Files as given; folders walked recursively for DICOM Part 10 files (hidden ones skipped).

    Returns the files and how many non-DICOM files the folder walk passed over.
    """
    files: list[Path] = []
    skipped = 0
    for path in inputs:
        if not path.is_dir():
            files.append(path)
            continue
        for found in sorted(path.rglob("*")):
            if not found.is_file() or any(p.startswith(".") for p in found.relative_to(path).parts):
                continue
            if _is_part10(found):
                files.append(found)
            else:
                skipped += 1
    return files, skipped


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not enabled,
        transient=True,
    )


@app.command()
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
        typer.Option(help="j2k (irreversible, CR > 1) or j2k-lossless (CR 1). Default: by CR."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    threads: Annotated[
        int | None, typer.Option(help="OpenJPEG threads (default: every core).", min=0)
    ] = None,
) -> None:
    """Transcode DICOM images to JPEG 2000 at a target compression ratio and measure the cost."""

    try:
        ratio = validate_cr(cr)
        chosen = OutputSyntax.for_cr(ratio, syntax)
    except InvalidParameter as exc:
        raise _fail(str(exc)) from None
    files, skipped = _expand(inputs)
    if skipped:
        err.print(f"note: skipped {skipped} non-DICOM file(s) in the input folder(s)")
    if not files:
        raise _fail("no DICOM input files")
    if output is not None and (len(files) != 1 or out_dir is not None):
        raise _fail("-o/--output takes exactly one input file and no --out-dir")
    target_dir = out_dir or Path("crgate-out")
    if output is None:
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _fail(f"{target_dir}: cannot create output folder ({exc.strerror})", 5) from None
    n_threads = get_settings().threads if threads is None else threads

    results: list[dict[str, Any]] = []
    failures: list[tuple[Path, CrgateError]] = []
    with _progress(len(files) > 1 and not as_json) as progress:
        task = progress.add_task("transcoding", total=len(files))
        for path in files:
            try:
                result = _transcode_one(path, output, target_dir, ratio, chosen, n_threads)
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
            progress.advance(task)

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
) -> dict[str, Any]:
    from services.core.pipeline import transcode_file

    out_dir = None if output is not None else target_dir
    result = transcode_file(path, output, cr=cr, out_dir=out_dir, syntax=syntax, threads=threads)
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


@app.command()
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
        raise _fail(str(exc), exc.exit_code) from None
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
        raise _fail(str(info["problem"]), 2)


@app.command()
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
        raise _fail(f"--studies {studies}: give at least 1 study")
    try:
        width, height = phantom.parse_size(size)
        overrides = _read_json_object(config_file) if config_file else {}
        config = phantom.PhantomConfig.from_overrides(overrides, width=width, height=height)
        out_dir.mkdir(parents=True, exist_ok=True)
        with _progress(studies > 1) as progress:
            task = progress.add_task("synthesising studies", total=studies)
            rows = phantom.write_studies(
                out_dir,
                studies,
                seed=seed,
                config=config,
                malignant_fraction=malignant_fraction,
                on_study=lambda _i: progress.advance(task),
            )
        record = {
            "config": asdict(config),
            "seed": seed,
            "studies": studies,
            "malignant_fraction": malignant_fraction,
        }
        (out_dir / "phantom.json").write_text(json.dumps(record, indent=2) + "\n")
    except CrgateError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    except OSError as exc:
        raise _fail(f"{out_dir}: cannot write ({exc.strerror or exc})", 5) from None
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


def _card_path(model: str | None) -> Path:
    """A model name in the models folder, or a path to a card."""
    settings = get_settings()
    name = model or settings.default_model
    candidate = Path(name)
    if candidate.suffix == ".json":
        return candidate
    return settings.models_dir / f"{name}.json"


@app.command()
def classify(
    paths: Annotated[list[Path], typer.Argument(help="Mammograms: files or folders.")],
    cr: Annotated[
        str, typer.Option("--cr", help="Compression ratio to test; 1 = lossless.")
    ] = "25",
    model: Annotated[
        str | None, typer.Option(help="Model name in the models folder, or a card .json path.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON lines: breasts, then images.")
    ] = False,
    overlays: Annotated[
        Path | None, typer.Option(help="Write Grad-CAM overlays (PNG) into this folder.")
    ] = None,
    threads: Annotated[int | None, typer.Option(min=0, help="OpenJPEG threads.")] = None,
) -> None:
    """Classify mammograms locally: transcode at the CR, infer on the compressed copy and on the
    original, print per breast both probabilities and per image the cost of the compression."""
    from services.core.dicom.io import read_dataset
    from services.core.inference.runtime import get_classifier
    from services.core.pipeline import classify_datasets

    try:
        ratio = validate_cr(cr)
        classifier = get_classifier(_card_path(model))
        files, skipped = _expand(paths)
        if skipped:
            err.print(f"note: skipped {skipped} non-DICOM file(s) in the input folder(s)")
        if not files:
            raise InvalidParameter("no DICOM input files")
        datasets = [(str(f), read_dataset(f)) for f in files]
        result = classify_datasets(
            datasets,
            classifier,
            cr=ratio,
            threads=get_settings().threads if threads is None else threads,
        )
        if overlays is not None:
            _write_overlays(overlays, result, datasets)
    except CrgateError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    if as_json:
        data = result.as_dict()
        for breast in data["breasts"]:
            print(json.dumps({"breast": breast, "model": data["model"], "cr": data["cr"]}))
        for image in data["images"]:
            print(json.dumps({"image": image}))
        return
    table = Table(title=f"{result.model} at CR {ratio:g}", title_justify="left")
    for column in ("study", "breast", "P(malignant) at CR", "on original", "change", "note"):
        table.add_column(column, overflow="fold")
    for b in result.breasts:
        table.add_row(
            Text(b.study_uid),
            b.laterality,
            f"{b.probability:.3f}",
            f"{b.probability_original:.3f}",
            f"{b.change:+.3f}",
            Text(b.fallback or ""),
        )
    out.print(table)
    images = Table(title="images", title_justify="left")
    for column in ("file", "achieved CR", "PSNR dB", "SSIM", "max err"):
        images.add_column(column)
    for r in result.images:
        images.add_row(
            Text(Path(r.source).name),
            f"{r.achieved_cr:.2f}" + ("" if r.reached else " (not reached)"),
            f"{r.psnr_db:.2f}",
            "-" if r.ssim is None else f"{r.ssim:.5f}",
            str(r.max_abs_error),
        )
    out.print(images)
    if overlays is not None:
        out.print(f"overlays written to {overlays}", markup=False, highlight=False)


def _write_overlays(
    folder: Path, result: Classification, datasets: list[tuple[str, Dataset]]
) -> None:
    """Full-size and preview overlay PNGs of every classified view, named by SOP UID."""
    from services.core.inference.breasts import window_of
    from services.core.inference.overlay import render_overlay, render_preview, write_png

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create overlay folder ({exc.strerror})") from None
    decoded = {r.input_sop_instance_uid: r for r in result.images}
    for _source, ds in datasets:
        uid = str(ds.SOPInstanceUID)
        saliency = result.saliency.get(uid)
        image = decoded[uid]
        if saliency is None or image.decoded is None:
            continue
        pixels = image.decoded.reshape(image.decoded.shape[-2:])
        bits, photometric, window = (
            int(ds.BitsStored),
            str(ds.PhotometricInterpretation),
            window_of(ds),
        )
        full = render_overlay(
            pixels, saliency, bits_stored=bits, photometric=photometric, window=window
        )
        preview = render_preview(
            pixels, saliency, bits_stored=bits, photometric=photometric, window=window
        )
        write_png(folder / f"{uid}.png", full)
        write_png(folder / f"{uid}.preview.png", preview)


def _parse_crs(text: str, option: str) -> list[float]:
    """ "1,15,25" -> [1.0, 15.0, 25.0]; each must be a valid CR."""
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise InvalidParameter(f"{option} is empty: give compression ratios like 1,25,100")
    try:
        return [validate_cr(v) for v in values]
    except InvalidParameter as exc:
        raise InvalidParameter(f"{option}: {exc}") from None


@app.command()
def train(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="A `crgate synth` folder.")],
    out_dir: Annotated[Path, typer.Option(help="Where the .onnx and its card go.")] = Path(
        "models"
    ),
    arch: Annotated[str, typer.Option(help="cnn3 or resnet18.")] = "cnn3",
    name: Annotated[str | None, typer.Option(help="Model name (default <arch>-phantom).")] = None,
    version: Annotated[str, typer.Option(help="Model version.")] = "v1",
    crs: Annotated[
        str, typer.Option(help="Training CR mixture, e.g. 1,15,20,25,50,100,500,1000,5000.")
    ] = "1",
    lossy_copies: Annotated[
        int,
        typer.Option(
            help="Compressed copies per training breast, CRs drawn from the mixture "
            "(0 = one at every CR of the mixture).",
            min=0,
        ),
    ] = 0,
    test_crs: Annotated[
        str, typer.Option(help="CRs to test at.")
    ] = "1,15,20,25,50,100,500,1000,5000,10000,11000",
    epochs: Annotated[int, typer.Option(min=1)] = 20,
    resize_fraction: Annotated[
        float, typer.Option(help="View grid as a fraction of the image size (study: 0.3).")
    ] = 0.3,
    align: Annotated[
        int, typer.Option(help="Pad each view's crop to a multiple of this many pixels.", min=1)
    ] = 32,
    view_gap: Annotated[
        int, typer.Option(help="Zero columns between the CC and MLO crops.", min=0)
    ] = 64,
    batch_size: Annotated[int, typer.Option(min=2)] = 32,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option()] = 0,
    folds: Annotated[
        int, typer.Option(help="k-fold cross-validation by patient instead (0 = off).", min=0)
    ] = 0,
    cache_dir: Annotated[
        Path, typer.Option(help="Compressed-copy cache, shared across runs.")
    ] = Path("var/cache/compressed"),
    workers: Annotated[int, typer.Option(help="Processes (default: every core).", min=0)] = 0,
    threads: Annotated[
        int, typer.Option(help="Torch threads for fitting (default: every core).", min=0)
    ] = 0,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for CIs.", min=10)] = 1000,
) -> None:
    """Train a classifier on phantoms with compression augmentation; export ONNX and its card."""
    try:
        train_crs = _parse_crs(crs, "--crs")
        tests = _parse_crs(test_crs, "--test-crs")
        if arch not in ("cnn3", "resnet18"):
            raise InvalidParameter(f"--arch {arch}: unknown architecture, use cnn3 or resnet18")
        if not 0.05 <= resize_fraction <= 1.0:
            raise InvalidParameter(
                f"--resize-fraction {resize_fraction}: use a fraction from 0.05 to 1"
            )
    except InvalidParameter as exc:
        raise _fail(str(exc)) from None
    try:
        from services.lab.training import train as training
    except ImportError as exc:
        raise _fail(
            f"training needs torch ({exc}): pip install -e '.[train]' (torch==2.13.0 on CPU)", 4
        ) from None
    config = training.TrainConfig(
        data_dir=data_dir,
        out_dir=out_dir,
        name=name or f"{arch}-phantom",
        version=version,
        architecture=arch,
        crs=train_crs,
        lossy_copies=lossy_copies,
        test_crs=tests,
        resize_fraction=resize_fraction,
        align=align,
        view_gap=view_gap,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=lr,
        seed=seed,
        cache_dir=cache_dir,
        workers=workers,
        threads=threads,
        bootstrap=bootstrap,
    )
    with _progress(True) as progress:
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        try:
            if folds:
                path = training.cross_validate(config, folds, report)
            else:
                card = training.train(config, report)
        except CrgateError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        except ValueError as exc:
            raise _fail(str(exc)) from None
    if folds:
        out.print(f"cross-validation results in {path}", highlight=False, markup=False)
    else:
        out.print(training.summary(card), highlight=False, markup=False)


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidParameter(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidParameter(f"{path}: expected a JSON object of PhantomConfig fields")
    return data


def _register_servers() -> None:
    from services import cli_serve

    cli_serve.register(app)


_register_servers()


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="crgate")


if __name__ == "__main__":  # pragma: no cover
    main()
