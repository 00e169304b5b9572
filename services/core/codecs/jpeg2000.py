"""JPEG 2000 encoding of a whole image (all frames) to a target compression ratio.

How the ratio is counted: :mod:`services.core.codecs.image`.

OpenJPEG treats its rate as a cap and counts it against the declared precision, so the first
attempt uses the rate the arithmetic predicts and later attempts correct it from the measured
size (secant steps in log space, bracketed) until the achieved CR lies within
:data:`CR_TOLERANCE` of the target. Rate steps are coarse where there are few code blocks or few
bytes: when no rate lands within the tolerance the search runs again with smaller code blocks
(finer truncation points), and tiny budgets start with the smallest blocks. A target the image
cannot reach (more bytes than coding every pass yields, or fewer than the headers need) returns
the closest result with ``reached=False`` and a note saying why.

How hard it searches is a :class:`RateSearch`: the gateway's (:data:`GATEWAY_SEARCH`) by
default; a caller that needs less precision (say 5 %, three encodes, 64 x 64 blocks only)
passes its own, and the search stops at its tolerance or its attempts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy.typing as npt

from services.core.codecs.image import CR_TOLERANCE, EncodedImage, PixelLayout, stored_size
from services.core.codecs.openjpeg import EncodeParams, encode_frame
from services.core.errors import InvalidParameter
from services.core.ratio import CompressionRatio

MAX_ATTEMPTS = 8
CODEBLOCK_SIZES = (64, 32, 16)
SMALL_BUDGET_BYTES = 4096
"""Below this many bytes per frame the rate steps of 64x64 code blocks are too coarse to land
within the tolerance (a few hundred bytes move in steps of 3-5 %): start with 16x16 blocks."""


@dataclass(frozen=True)
class RateSearch:
    """How hard :func:`encode_image` searches OpenJPEG's rate for a target CR."""

    tolerance: float = CR_TOLERANCE
    """Relative distance between achieved and target CR that ends the search."""
    max_attempts: int = MAX_ATTEMPTS
    """Encodes per code-block size at most."""
    codeblocks: tuple[int, ...] = CODEBLOCK_SIZES
    """Code-block sizes tried in turn while the target is not reached (reversed for budgets
    under :data:`SMALL_BUDGET_BYTES` per frame)."""
    greedy: bool = False
    """Every attempt goes for the target (for a handful of attempts): outside a bracket, step
    along the log-log secant through the last two attempts (not bytes ~ 1/rate from the last
    one), and spend no attempt on finding a hard limit when the size stalls."""

    def __post_init__(self) -> None:
        if not 0 < self.tolerance < 1 or self.max_attempts < 1 or not self.codeblocks:
            raise InvalidParameter(
                f"{self}: needs a tolerance in (0, 1), one attempt and one block size at least"
            )


GATEWAY_SEARCH = RateSearch()


def encode_image(
    frames: Sequence[npt.NDArray[Any]],
    layout: PixelLayout,
    target_cr: float,
    *,
    lossless: bool,
    threads: int = 0,
    search: RateSearch = GATEWAY_SEARCH,
) -> EncodedImage:
    """Encode ``frames`` (each (rows, cols) or (rows, cols, 3)) reversibly or to ``target_cr``
    (searched as ``search`` says)."""
    if lossless:
        codestreams = _encode_all(frames, layout, None, reversible=True, threads=threads)
        achieved = layout.uncompressed_bytes / stored_size(codestreams)
        return EncodedImage(codestreams, True, 1.0, achieved, True, None, 1)
    if not isinstance(target_cr, CompressionRatio):  # a checked value is trusted
        target_cr = CompressionRatio(target_cr)
    if target_cr.lossless:
        raise InvalidParameter("CR 1 means lossless: use the JPEG 2000 lossless syntax for it")

    result: EncodedImage | None = None
    attempts = 0
    budget = layout.uncompressed_bytes / target_cr / max(1, layout.frames)
    sizes = search.codeblocks if budget >= SMALL_BUDGET_BYTES else search.codeblocks[::-1]
    for codeblock in sizes:

        def attempt(rate: float | None, codeblock: int = codeblock) -> list[bytes]:
            return _encode_all(
                frames, layout, rate, reversible=False, threads=threads, codeblock=codeblock
            )

        found, hard_limit = _search_rate(attempt, layout, target_cr, search)
        attempts += found.attempts
        if result is None or _log_error(found) < _log_error(result):
            result = found
        if found.reached or hard_limit:
            break
    assert result is not None
    return replace(result, attempts=attempts)


def _log_error(result: EncodedImage) -> float:
    return abs(math.log(result.achieved_cr / result.target_cr))


def _encode_all(
    frames: Sequence[npt.NDArray[Any]],
    layout: PixelLayout,
    rate: float | None,
    *,
    reversible: bool,
    threads: int,
    codeblock: int = 64,
) -> list[bytes]:
    params = EncodeParams(
        bits_stored=layout.bits_stored,
        signed=layout.signed,
        reversible=reversible,
        rate=rate,
        threads=threads,
        codeblock=codeblock,
    )
    return [encode_frame(frame, params) for frame in frames]


def _search_rate(
    attempt: Callable[[float | None], list[bytes]],
    layout: PixelLayout,
    target_cr: float,
    search: RateSearch,
) -> tuple[EncodedImage, bool]:
    """Search OpenJPEG's rate for ``target_cr``; the flag says a hard limit stopped it."""
    target_bytes = layout.uncompressed_bytes / target_cr
    rate: float | None = layout.declared_bytes / target_bytes
    too_big: tuple[float, int] | None = None  # (rate, bytes) with bytes > target
    too_small: tuple[float, int] | None = None  # (rate, bytes) with bytes < target
    best: tuple[float, list[bytes]] | None = None  # (|log error|, codestreams)
    tried: dict[float | None, int] = {}
    previous_size: int | None = None
    last: tuple[float, int] | None = None  # (rate, bytes) of the attempt before this one
    hard_limit = False
    repeats = 0  # sizes seen before: the rate steps are coarse here

    for attempts in range(1, search.max_attempts + 1):
        codestreams = attempt(rate)
        size = stored_size(codestreams)
        repeats += size in tried.values()
        tried[rate] = size
        error = abs(math.log(size / target_bytes))
        if best is None or error < best[0]:
            best = (error, codestreams)
        achieved = layout.uncompressed_bytes / size
        if abs(achieved / target_cr - 1) <= search.tolerance:
            result = EncodedImage(codestreams, False, target_cr, achieved, True, None, attempts)
            return result, False

        stalled = (
            not search.greedy
            and previous_size is not None
            and abs(size - previous_size) <= 0.005 * previous_size
        )
        previous_size = size
        if stalled and too_small is None:
            hard_limit = True  # a higher rate no longer shrinks the codestream: headers dominate
            break
        current = 1.0 if rate is None else rate  # OpenJPEG: a rate <= 1 codes every pass
        if size > target_bytes:
            too_big = (current, size)
        else:
            too_small = (current, size)
            if rate is None:  # every pass coded and still too small: no rate gives more bytes
                hard_limit = True
                break
        if repeats >= 2 and too_big and too_small:
            break  # the target falls between two rate steps: smaller code blocks may help
        next_rate = _next_rate(
            current, size, target_bytes, too_big, too_small, last if search.greedy else None
        )
        last = (current, size)
        if stalled and too_big is None:
            next_rate = 1.0  # a lower rate no longer grows it: confirm with every pass coded
        if too_small and too_big and abs(too_big[0] - too_small[0]) < 1e-6 * too_small[0]:
            break  # the bracket has collapsed: no rate gives the target
        if next_rate <= 1.0:
            next_rate_opt: float | None = None  # OpenJPEG: a rate <= 1 codes every pass
        else:
            next_rate_opt = next_rate
        if next_rate_opt in tried:
            break
        rate = next_rate_opt

    assert best is not None
    codestreams = best[1]
    size = stored_size(codestreams)
    achieved = layout.uncompressed_bytes / size
    note = (
        _unreached_note(target_cr, achieved, target_bytes, size)
        if hard_limit
        else (
            f"target CR {target_cr:g} not reached: OpenJPEG's rate steps for this image skip "
            f"from CR {layout.uncompressed_bytes / too_big[1]:.2f} to "
            f"{layout.uncompressed_bytes / too_small[1]:.2f}; achieved CR {achieved:.2f}"
            if too_big and too_small
            else f"target CR {target_cr:g} not reached; achieved CR {achieved:.2f}"
        )
    )
    return EncodedImage(
        codestreams, False, target_cr, achieved, False, note, len(tried)
    ), hard_limit


def _next_rate(
    rate: float,
    size: int,
    target_bytes: float,
    too_big: tuple[float, int] | None,
    too_small: tuple[float, int] | None,
    last: tuple[float, int] | None = None,
) -> float:
    """Next rate to try: bytes ~ 1/rate, refined by a log-space secant inside the bracket, or
    outside it (extrapolating) through ``last``, the attempt before, when one is given."""
    if too_big and too_small and too_big[1] != too_small[1] and too_big[0] > 0:
        (r1, n1), (r2, n2) = too_big, too_small
        slope = (math.log(r2) - math.log(r1)) / (math.log(n2) - math.log(n1))
        guess = math.exp(math.log(r1) + slope * (math.log(target_bytes) - math.log(n1)))
        low, high = sorted((r1, r2))
        if not low < guess < high:
            guess = math.sqrt(low * high)
        return guess
    if last is not None and last[1] != size and last[0] > 0:
        slope = (math.log(rate) - math.log(last[0])) / (math.log(size) - math.log(last[1]))
        try:
            guess = math.exp(math.log(rate) + slope * (math.log(target_bytes) - math.log(size)))
        except OverflowError:
            guess = math.inf
        if math.isfinite(guess) and guess > 0:
            return guess
    return rate * size / target_bytes


def _unreached_note(target_cr: float, achieved: float, target_bytes: float, size: int) -> str:
    if achieved < target_cr:
        return (
            f"target CR {target_cr:g} not reached: the smallest codestream OpenJPEG produces for "
            f"this image is {size} bytes (headers and minimal data), more than the "
            f"{target_bytes:.0f} bytes the target allows; achieved CR {achieved:.2f}"
        )
    return (
        f"target CR {target_cr:g} not reached: even coding every pass yields only {size} "
        f"bytes, fewer than the {target_bytes:.0f} bytes the target asks for (the image "
        f"compresses better than that losslessly: use CR 1); achieved CR {achieved:.2f}"
    )
