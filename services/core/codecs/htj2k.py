"""High-Throughput JPEG 2000 (ISO/IEC 15444-15) encoding of a whole image to a target CR.

The encoder is OpenJPH as bundled in imagecodecs (``htj2k_encode``). It has no rate control:
lossy coding takes one quantisation step (relative to the full sample range), so the target CR is
reached by searching the step. Bytes fall roughly as a power of the step, so the search works in
log space: a first step from a rate model, then secant steps through the last two encodes,
bracketed once the target lies between two of them, until the achieved CR lies within
:data:`~services.core.codecs.image.CR_TOLERANCE` of the target (counted from the bytes, as for
JPEG 2000). Targets the image cannot reach return the closest result with a note.

Precision. imagecodecs declares the codestream's precision as the array's item size (16 bits
for uint16), whatever Bits Stored says. crgate writes precision = Bits Stored, as it does for
JPEG 2000, so that every decoder (pydicom's plugins, GDCM, Cornerstone) sees the sample range the
DICOM header declares. The data is prepared so that the coded values mean the same under the
smaller precision, then SIZ is rewritten (:func:`codestream.with_precision`):

- irreversible: samples are shifted left by ``container - Bits Stored`` bits. Steps are relative
  to 2**precision and DC level shifts are 2**(precision-1), so the shifted image at 16 bits is
  coded exactly as the original at Bits Stored bits; the decoder's steps, read against the
  declared precision, reconstruct the original scale.
- reversible: integer wavelets code the samples themselves, so only the unsigned DC level shift
  differs (2**15 against 2**(B-1)): unsigned samples are offset by the difference. The
  quantisation exponents then allow more magnitude bit-planes than the samples use, which the
  standard permits (they are an upper bound).

The output is decoded again by OpenJPEG for the metrics (and in the tests by pydicom's
plugins), so what crgate reports is what a reader gets from the codestream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from services.core.codecs.codestream import with_precision
from services.core.codecs.image import CR_TOLERANCE, EncodedImage, PixelLayout, stored_size
from services.core.errors import CodecError, CodecUnavailable, InvalidParameter
from services.core.ratio import CompressionRatio

PACKAGE = "imagecodecs"
MAX_ATTEMPTS = 12
DEFAULT_DECOMPOSITIONS = 5
"""Wavelet levels of crgate's HT output (6 resolutions, as for JPEG 2000)."""
RPCL_SMALLEST_RESOLUTION = 64
"""HTJ2K Lossless RPCL (.202): decompositions until the lowest resolution is at most this wide
and high (PS3.5 A.4.x), so a viewer can start from a thumbnail."""
STEP_LIMITS = (1e-9, 16.0)
"""Quantisation steps searched (relative to the sample range): below, the step no longer adds
bytes; above, only headers are left."""
_MAX_LOG_FACTOR = math.log(64)
"""A step moves by at most this factor per attempt outside a bracket."""
_REFERENCE = (0.003, 0.9)
"""(step, bits per sample) measured on a 12-bit phantom mammogram: where the search starts."""


def is_available() -> bool:
    """True when imagecodecs with its OpenJPH (HTJ2K) codec can be imported."""
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(getattr(imagecodecs, "HTJ2K", None) and imagecodecs.HTJ2K.available)


def _codec() -> Any:
    if not is_available():
        raise CodecUnavailable(
            "HTJ2K needs imagecodecs with OpenJPH: pip install imagecodecs (crgate's dependency)"
        )
    import imagecodecs

    return imagecodecs


@dataclass(frozen=True)
class HTParams:
    """How to encode one frame."""

    bits_stored: int
    signed: bool
    reversible: bool
    step: float = 0.0
    """Quantisation step for irreversible coding (ignored when reversible)."""
    decompositions: int = DEFAULT_DECOMPOSITIONS
    rpcl: bool = False
    """The .202 options: TLM marker segment and one tile-part per resolution (RPCL is
    OpenJPH's progression order for every HT output)."""


def decompositions_for(rows: int, columns: int, *, rpcl: bool) -> int:
    """Wavelet levels for a frame: the default, no more than the frame allows, and for .202
    enough for the lowest resolution to fit :data:`RPCL_SMALLEST_RESOLUTION`."""
    levels = min(DEFAULT_DECOMPOSITIONS, max(0, int(math.log2(max(1, min(rows, columns))))))
    if rpcl:
        while max(rows, columns) > RPCL_SMALLEST_RESOLUTION << levels:
            levels += 1
    return min(levels, 32)


def encode_frame(frame: npt.NDArray[Any], params: HTParams) -> bytes:
    """One frame, (rows, cols) or (rows, cols, 3), as an HT codestream declaring Bits Stored.

    Three-sample frames use the component transform (ICT or RCT), as DICOM's YBR_ICT/YBR_RCT
    require.
    """
    codec = _codec()
    container = frame.dtype.itemsize * 8
    shift = container - params.bits_stored
    if shift < 0 or frame.dtype.kind not in "ui":
        raise CodecError(f"HTJ2K: {frame.dtype} samples cannot hold {params.bits_stored} bits")
    prepared = _prepare(frame, params, shift)
    try:
        codestream: bytes = codec.htj2k_encode(
            prepared,
            level=params.step if not params.reversible else 0,
            reversible=params.reversible,
            resolutions=params.decompositions,
            tlm=params.rpcl,
            tilepart=1 if params.rpcl else 0,
        )
    except Exception as exc:  # imagecodecs raises its own error types
        rows, cols = frame.shape[:2]
        raise CodecError(f"OpenJPH failed to encode a {cols}x{rows} frame: {exc}") from None
    if shift:
        codestream = with_precision(codestream, params.bits_stored, params.signed)
    return codestream


def _prepare(frame: npt.NDArray[Any], params: HTParams, shift: int) -> npt.NDArray[Any]:
    """The samples to give OpenJPH so that, declared at Bits Stored, they decode to ``frame``."""
    if not shift:
        return frame
    if not params.reversible:
        shifted: npt.NDArray[Any] = np.left_shift(frame, shift)
        return shifted
    if params.signed:
        return frame
    container = frame.dtype.itemsize * 8
    offset = (1 << (container - 1)) - (1 << (params.bits_stored - 1))
    offset_frame: npt.NDArray[Any] = frame + frame.dtype.type(offset)
    return offset_frame


def encode_image(
    frames: Sequence[npt.NDArray[Any]],
    layout: PixelLayout,
    target_cr: float,
    *,
    lossless: bool,
    rpcl: bool = False,
    tolerance: float = CR_TOLERANCE,
    max_attempts: int = MAX_ATTEMPTS,
) -> EncodedImage:
    """Encode ``frames`` reversibly (``rpcl``: with the .202 options) or to ``target_cr``."""
    levels = decompositions_for(layout.rows, layout.columns, rpcl=rpcl)

    def attempt(step: float, reversible: bool = False) -> list[bytes]:
        params = HTParams(
            layout.bits_stored, layout.signed, reversible, step, decompositions=levels, rpcl=rpcl
        )
        return [encode_frame(frame, params) for frame in frames]

    if lossless:
        codestreams = attempt(0.0, reversible=True)
        achieved = layout.uncompressed_bytes / stored_size(codestreams)
        return EncodedImage(codestreams, True, 1.0, achieved, True, None, 1)
    if rpcl:
        raise InvalidParameter("HTJ2K Lossless RPCL is lossless only: use htj2k for a CR > 1")
    if not isinstance(target_cr, CompressionRatio):  # a checked value is trusted
        target_cr = CompressionRatio(target_cr)
    if target_cr.lossless:
        raise InvalidParameter("CR 1 means lossless: use an HTJ2K lossless syntax for it")
    return _search_step(attempt, layout, target_cr, tolerance, max_attempts)


def _search_step(
    attempt: Callable[[float], list[bytes]],
    layout: PixelLayout,
    target_cr: float,
    tolerance: float,
    max_attempts: int,
) -> EncodedImage:
    target_bytes = layout.uncompressed_bytes / target_cr
    samples = layout.rows * layout.columns * layout.samples * layout.frames
    low, high = STEP_LIMITS
    step = _first_step(8 * target_bytes / samples)
    tried: list[tuple[float, int, list[bytes]]] = []  # (step, bytes, codestreams)
    for _ in range(max_attempts):
        codestreams = attempt(step)
        size = stored_size(codestreams)
        tried.append((step, size, codestreams))
        achieved = layout.uncompressed_bytes / size
        if abs(achieved / target_cr - 1) <= tolerance:
            return EncodedImage(
                codestreams, False, target_cr, achieved, True, None, len(tried), step
            )
        next_step = _next_step(tried, target_bytes)
        if next_step is None or not low <= next_step <= high:
            break
        if any(abs(math.log(next_step / s)) < 1e-9 for s, _, _ in tried):
            break  # the bracket has collapsed: no step gives the target
        step = next_step
    best_step, size, codestreams = min(tried, key=lambda t: abs(math.log(t[1] / target_bytes)))
    achieved = layout.uncompressed_bytes / size
    bigger = [n for _, n, _ in tried if n > target_bytes]
    smaller = [n for _, n, _ in tried if n < target_bytes]
    if bigger and smaller:
        note = (
            f"target CR {target_cr:g} not reached in {len(tried)} encodes: the closest steps "
            f"gave CR {layout.uncompressed_bytes / min(bigger):.2f} and "
            f"{layout.uncompressed_bytes / max(smaller):.2f}; achieved CR {achieved:.2f}"
        )
    else:
        note = _unreached_note(target_cr, achieved, target_bytes, size, best_step)
    return EncodedImage(codestreams, False, target_cr, achieved, False, note, len(tried), best_step)


def _first_step(bits_per_sample: float) -> float:
    """A first step from the reference point, bytes taken as inversely proportional to it."""
    step, bits = _REFERENCE
    return min(max(step * bits / max(bits_per_sample, 1e-6), STEP_LIMITS[0]), STEP_LIMITS[1])


def _next_step(tried: list[tuple[float, int, list[bytes]]], target_bytes: float) -> float | None:
    """Secant in (log step, log bytes): between the closest steps either side of the target
    once there are both, else through the last two attempts (bytes ~ 1/step for the first).

    None when the size no longer moves with the step (headers only, or every bit coded)."""
    above = [(s, n) for s, n, _ in tried if n > target_bytes]  # too many bytes: step too small
    below = [(s, n) for s, n, _ in tried if n < target_bytes]
    if above and below:
        (s1, n1), (s2, n2) = max(above), min(below)  # largest step too big, smallest too small
        if n1 == n2:
            return None
        slope = (math.log(s2) - math.log(s1)) / (math.log(n2) - math.log(n1))
        guess = math.exp(math.log(s1) + slope * (math.log(target_bytes) - math.log(n1)))
        if not min(s1, s2) < guess < max(s1, s2):
            guess = math.sqrt(s1 * s2)
        return guess
    step, size = tried[-1][0], tried[-1][1]
    slope = -1.0
    if len(tried) >= 2:
        s0, n0 = tried[-2][0], tried[-2][1]
        if n0 == size:
            return None  # the step no longer changes the size
        slope = (math.log(step) - math.log(s0)) / (math.log(size) - math.log(n0))
        if slope >= 0:  # noise in a near-flat region: fall back to the model
            slope = -1.0
    log_factor = slope * (math.log(target_bytes) - math.log(size))
    return step * math.exp(min(max(log_factor, -_MAX_LOG_FACTOR), _MAX_LOG_FACTOR))


def _unreached_note(
    target_cr: float, achieved: float, target_bytes: float, size: int, step: float
) -> str:
    if achieved < target_cr:
        return (
            f"target CR {target_cr:g} not reached: the smallest HTJ2K codestream for this image "
            f"is {size} bytes (headers and minimal data, step {step:.3g}), more than the "
            f"{target_bytes:.0f} bytes the target allows; achieved CR {achieved:.2f}"
        )
    return (
        f"target CR {target_cr:g} not reached: even the finest step ({step:.3g}) yields only "
        f"{size} bytes, fewer than the {target_bytes:.0f} bytes the target asks for (the image "
        f"compresses better than that losslessly: use CR 1); achieved CR {achieved:.2f}"
    )
