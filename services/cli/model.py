"""``crgate classify | train``: the classifier on local files, and training one on phantoms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from services.cli.common import cr_list, err, expand, fail, out, progress
from services.core.codecs import SYNTAX_HELP, OutputSyntax
from services.core.config import get_settings
from services.core.errors import CrgateError, InvalidParameter, OutputError
from services.core.ratio import STUDY_CRS_TEXT, validate_cr

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from services.core.pipeline import Classification


def _card_path(model: str | None) -> Path:
    """A model name in the models folder, or a path to a card."""
    settings = get_settings()
    name = model or settings.default_model
    candidate = Path(name)
    if candidate.suffix == ".json":
        return candidate
    return settings.models_dir / f"{name}.json"


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
    syntax: Annotated[OutputSyntax | None, typer.Option(help=SYNTAX_HELP)] = None,
) -> None:
    """Classify mammograms locally: transcode at the CR, infer on the compressed copy and on the
    original, print per breast both probabilities and per image the cost of the compression."""
    from services.core.dicom.io import read_dataset
    from services.core.inference.runtime import get_classifier
    from services.core.pipeline import classify_datasets

    try:
        ratio = validate_cr(cr)
        chosen = OutputSyntax.for_cr(ratio, syntax)
        classifier = get_classifier(_card_path(model))
        files, skipped = expand(paths)
        if skipped:
            err.print(f"note: skipped {skipped} non-DICOM file(s) in the input folder(s)")
        if not files:
            raise InvalidParameter("no DICOM input files")
        datasets = [(str(f), read_dataset(f)) for f in files]
        result = classify_datasets(
            datasets,
            classifier,
            cr=ratio,
            syntax=chosen,
            threads=get_settings().threads if threads is None else threads,
        )
        if overlays is not None:
            _write_overlays(overlays, result, datasets)
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
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
    test_crs: Annotated[str, typer.Option(help="CRs to test at.")] = STUDY_CRS_TEXT,
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
        train_crs = cr_list(crs, "--crs")
        tests = cr_list(test_crs, "--test-crs")
        if arch not in ("cnn3", "resnet18"):
            raise InvalidParameter(f"--arch {arch}: unknown architecture, use cnn3 or resnet18")
        if not 0.05 <= resize_fraction <= 1.0:
            raise InvalidParameter(
                f"--resize-fraction {resize_fraction}: use a fraction from 0.05 to 1"
            )
    except InvalidParameter as exc:
        raise fail(str(exc)) from None
    try:
        from services.lab.training import train as training
    except ImportError as exc:
        raise fail(
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
    with progress(True) as bar:
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        try:
            if folds:
                path = training.cross_validate(config, folds, report)
            else:
                card = training.train(config, report)
        except CrgateError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except ValueError as exc:
            raise fail(str(exc)) from None
    if folds:
        out.print(f"cross-validation results in {path}", highlight=False, markup=False)
    else:
        out.print(training.summary(card), highlight=False, markup=False)
