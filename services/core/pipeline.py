"""Use cases that compose the core modules: ``transcode`` (decode, encode to a target CR,
encapsulate, measure) and ``classify`` (transcode a set of mammograms, then classify each breast
on the compressed copy and on the original). Ingest lives in services/core/ingest.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from services.core import metrics
from services.core.codecs import OutputSyntax
from services.core.codecs.image import EncodedImage
from services.core.codecs.openjpeg import decode_codestream
from services.core.dicom.derive import build_output
from services.core.dicom.io import read_dataset, write_dataset
from services.core.dicom.pixels import ImagePixels, load_pixels
from services.core.errors import InvalidParameter, OutputError
from services.core.ratio import CompressionRatio

if TYPE_CHECKING:  # onnxruntime loads only when something is classified
    from services.core.inference.runtime import Classifier


@dataclass(frozen=True)
class TranscodeResult:
    """What one transcode did and what it cost. ``dataset`` is the output (not serialised)."""

    source: str
    input_sop_instance_uid: str
    output_sop_instance_uid: str
    input_syntax: str
    output_syntax: str
    target_cr: float
    achieved_cr: float
    reached: bool
    note: str | None
    lossless: bool
    psnr_db: float
    ssim: float | None  # None for images under 7x7 pixels (SSIM's window)
    mse: float
    max_abs_error: int
    bits_per_pixel: float
    bytes_in: int  # uncompressed Pixel Data bytes
    bytes_out: int  # JPEG 2000 codestream bytes (all frames)
    encode_attempts: int
    decode_ms: float
    encode_ms: float
    metrics_ms: float
    total_ms: float
    output: str | None = None
    dataset: Dataset | None = field(default=None, repr=False, compare=False)
    decoded: np.ndarray[Any, Any] | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k not in ("dataset", "decoded")}
        return data


def transcode_dataset(
    ds: Dataset,
    *,
    cr: CompressionRatio,
    syntax: OutputSyntax | str | None = None,
    threads: int = 0,
    source: str = "<dataset>",
) -> TranscodeResult:
    """Transcode ``ds`` to ``syntax`` (by default JPEG 2000) at ``cr`` (1 = lossless) and
    measure the cost.

    The metrics compare the decoded input with the output decoded again by OpenJPEG: the
    pixels a reader of the output file gets.
    """
    started = time.perf_counter()
    out_syntax = OutputSyntax.for_cr(cr, syntax)
    pixels = load_pixels(ds, source)
    decoded_at = time.perf_counter()

    layout = pixels.layout
    encoded = out_syntax.codec.encode(pixels.frame_list(), layout, cr, threads=threads)
    if not encoded.reached:
        encoded, out_syntax = _lossless_if_within_budget(pixels, encoded, out_syntax, threads)
    output = build_output(ds, encoded, out_syntax, pixels.photometric)
    encoded_at = time.perf_counter()

    decoded = decode_frames(encoded.frames, threads).reshape(pixels.frames.shape)
    quality = _measure(pixels, decoded)
    finished = time.perf_counter()
    return TranscodeResult(
        source=source,
        input_sop_instance_uid=str(ds.SOPInstanceUID),
        output_sop_instance_uid=str(output.SOPInstanceUID),
        input_syntax=str(UID(ds.file_meta.TransferSyntaxUID)),
        output_syntax=str(out_syntax.uid),
        target_cr=cr,
        achieved_cr=encoded.achieved_cr,
        reached=encoded.reached,
        note=encoded.note,
        lossless=encoded.lossless,
        psnr_db=quality.psnr_db,
        ssim=quality.ssim,
        mse=quality.mse,
        max_abs_error=quality.max_abs_error,
        bits_per_pixel=metrics.bits_per_pixel(
            encoded.compressed_bytes, layout.rows * layout.columns * layout.frames
        ),
        bytes_in=layout.uncompressed_bytes,
        bytes_out=encoded.compressed_bytes,
        encode_attempts=encoded.attempts,
        decode_ms=(decoded_at - started) * 1000,
        encode_ms=(encoded_at - decoded_at) * 1000,
        metrics_ms=(finished - encoded_at) * 1000,
        total_ms=(finished - started) * 1000,
        dataset=output,
        decoded=decoded,
    )


def _lossless_if_within_budget(
    pixels: ImagePixels, lossy: EncodedImage, syntax: OutputSyntax, threads: int
) -> tuple[EncodedImage, OutputSyntax]:
    """The lossy search missed its target; when a lossless encode takes no more bytes than
    the target allows, that one is written instead: exact pixels, not marked lossy, UIDs
    kept. Otherwise the lossy result stands, with its note."""
    layout = pixels.layout
    sibling = syntax.lossless_sibling
    lossless = sibling.codec.encode(pixels.frame_list(), layout, 1, threads=threads)
    budget = layout.uncompressed_bytes / lossy.target_cr
    if lossless.compressed_bytes > budget:
        return lossy, syntax
    note = (
        f"CR {lossy.target_cr:g} not reached lossy (best {lossy.achieved_cr:.2f}); the lossless "
        f"encode ({lossless.compressed_bytes} bytes, CR {lossless.achieved_cr:.2f}) fits the "
        "budget and was written instead: exact pixels, not marked lossy"
    )
    fallback = replace(lossless, target_cr=lossy.target_cr, reached=True, note=note)
    return fallback, sibling


def decode_frames(codestreams: list[bytes], threads: int = 0) -> np.ndarray[Any, Any]:
    """Decode crgate's own codestreams (any syntax it writes) back to a (frames, rows,
    cols[, samples]) array."""
    return np.stack([decode_codestream(c, threads) for c in codestreams])


def _measure(pixels: ImagePixels, decoded: np.ndarray[Any, Any]) -> metrics.ImageQuality:
    layout = pixels.layout
    if min(layout.rows, layout.columns) < metrics.SSIM_WINDOW:
        return metrics.ImageQuality(
            psnr_db=metrics.psnr(pixels.frames, decoded, layout.bits_stored),
            ssim=None,
            mse=metrics.mse(pixels.frames, decoded),
            max_abs_error=metrics.max_abs_error(pixels.frames, decoded),
        )
    return metrics.compare(
        pixels.frames, decoded, bits_stored=layout.bits_stored, samples_per_pixel=layout.samples
    )


def transcode_file(
    path: Path,
    out_path: Path | None = None,
    *,
    cr: CompressionRatio,
    out_dir: Path | None = None,
    syntax: OutputSyntax | str | None = None,
    threads: int = 0,
    batch: dict[Path, Path] | None = None,
) -> TranscodeResult:
    """Read ``path``, transcode it, write the output atomically (nothing partial on failure):
    to ``out_path``, or into ``out_dir`` named ``<output SOP Instance UID>.dcm``.

    ``batch`` maps the outputs a batch wrote so far to their inputs: an output that would
    overwrite one of them (two inputs with one SOP Instance UID, kept at CR 1) is refused.
    """
    if (out_path is None) == (out_dir is None):
        raise InvalidParameter("give exactly one of an output file and an output folder")
    ds = read_dataset(path)
    result = transcode_dataset(ds, cr=cr, syntax=syntax, threads=threads, source=str(path))
    assert result.dataset is not None
    destination = out_path or Path(str(out_dir)) / f"{result.output_sop_instance_uid}.dcm"
    if destination.resolve() == path.resolve():
        raise OutputError(f"{destination}: refusing to overwrite the input file")
    earlier = None if batch is None else batch.get(destination.resolve())
    if earlier is not None:
        raise OutputError(
            f"{path}: its output {destination} would overwrite that of {earlier} (the same SOP "
            "Instance UID); transcode inputs with one UID into separate folders"
        )
    write_dataset(result.dataset, destination)
    if batch is not None:
        batch[destination.resolve()] = path
    return replace(result, output=str(destination))


@dataclass(frozen=True)
class BreastFinding:
    """One breast: the probability on the compressed copy and on the original."""

    study_uid: str
    laterality: str
    probability: float
    probability_original: float
    threshold: float
    saliency_method: str
    fallback: str | None

    @property
    def change(self) -> float:
        """How much compression moved the AI: probability at the CR minus on the original."""
        return self.probability - self.probability_original


@dataclass(frozen=True)
class Classification:
    """What classifying a set of mammograms at one CR found and cost."""

    model: str
    model_sha256: str
    cr: float
    breasts: list[BreastFinding]
    images: list[TranscodeResult]
    saliency: dict[str, np.ndarray[Any, Any]] = field(repr=False)  # SOP UID -> map at the CR

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_sha256": self.model_sha256,
            "cr": self.cr,
            "breasts": [{**b.__dict__, "change": b.change} for b in self.breasts],
            "images": [r.as_dict() for r in self.images],
        }


def classify_datasets(
    datasets: list[tuple[str, Dataset]],
    classifier: Classifier,
    *,
    cr: CompressionRatio,
    syntax: OutputSyntax | str | None = None,
    threads: int = 0,
    on_image: Callable[[int, int], None] | None = None,
) -> Classification:
    """Transcode every view at ``cr``, then classify each breast on the compressed copy and on
    the original in the same call: the difference is what the compression did to the AI.

    ``on_image(done, total)`` is called after each image is transcoded (progress).
    """
    from services.core.inference.breasts import classify_breasts, group_breasts

    originals = group_breasts(datasets)  # validates modality, laterality, views first
    transcoded = {}
    for done, (source, ds) in enumerate(datasets, start=1):
        transcoded[source] = transcode_dataset(
            ds, cr=cr, syntax=syntax, threads=threads, source=source
        )
        if on_image is not None:
            on_image(done, len(datasets))
    compressed = [
        replace(
            breast,
            views={
                view: replace(image, pixels=_decoded_frame(transcoded[image.source]))
                for view, image in breast.views.items()
            },
        )
        for breast in originals
    ]
    at_cr = classify_breasts(classifier, compressed)
    at_original = classify_breasts(classifier, originals, saliency=False)  # only shown at the CR
    findings = [
        BreastFinding(
            study_uid=c.study_uid,
            laterality=c.laterality,
            probability=c.probability,
            probability_original=o.probability,
            threshold=c.threshold,
            saliency_method=c.saliency_method,
            fallback=c.fallback,
        )
        for c, o in zip(at_cr, at_original, strict=True)
    ]
    saliency = {v.sop_instance_uid: v.saliency for c in at_cr for v in c.views.values()}
    return Classification(
        model=f"{classifier.card.name}-{classifier.card.version}",
        model_sha256=classifier.card.sha256,
        cr=cr,
        breasts=findings,
        images=list(transcoded.values()),
        saliency=saliency,
    )


def _decoded_frame(result: TranscodeResult) -> np.ndarray[Any, Any]:
    assert result.decoded is not None
    return result.decoded.reshape(result.decoded.shape[-2:])
