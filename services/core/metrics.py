"""What a lossy transcode cost: compression ratio, bits per pixel, MSE, PSNR, max error, SSIM.

Pure functions on integer numpy arrays. Accepted layouts, told apart by ``samples_per_pixel``:
(rows, cols) and (frames, rows, cols) when it is 1, (rows, cols, samples) and
(frames, rows, cols, samples) when it is more.

PSNR follows the seed paper's Eq. 1 with the peak generalised to ``2**bits_stored - 1`` and
reports exactly 100.0 dB for an exact copy (a sentinel for infinity, as the paper does; a
near-exact copy of deep data can score higher than that). Differences are taken in int32/int64,
so signed (CT) data and full-range 16-bit data cannot overflow.

SSIM is ``skimage.metrics.structural_similarity(ref, test, data_range=2**bits_stored - 1)``
with its defaults (7x7 uniform window, K1=0.01, K2=0.03, sample covariance, mean over the
windows that lie wholly inside the image), computed per 2D plane: a multi-frame image scores
the mean over frames, a colour image the mean over samples (skimage's ``channel_axis``). It is
computed differently to be fast:

* The five 7x7 window means skimage filters in float64 become four exact integer box sums
  (x, y, x*x + y*y and x*y; only the sum of the two variances is needed) taken on the valid
  windows only, so the border handling of the filter never matters.
* With the sums ``sx, sy, sq, sp`` over N = 49 pixels, the SSIM of a window is
  ``(2*sx*sy + c1) * (2*(N*sp - sx*sy) + c2) / ((sx*sx + sy*sy + c1) * (V + c2))``,
  ``V = N*sq - sx*sx - sy*sy``, ``c1 = C1*N*N``, ``c2 = C2*N*(N-1)``: skimage's formula
  multiplied through by N*N and N*(N-1). The integer terms (sx*sy, N*sp - sx*sy, V) stay below
  2**53 for data of up to 16 bits, so float64 holds them exactly and no variance is lost to
  cancellation; the result matches skimage to about 1e-15.
* The plane is processed in strips of a few rows (plus the 6-row halo) small enough to stay in
  the CPU cache, with preallocated buffers; strips are shared out to a thread pool, which helps
  because numpy's array operations release the GIL. Box sums use int32 when the data is small
  enough (up to |value| 4681, i.e. 12-bit data), int64 otherwise (float64 beyond 2**20).

``compare`` computes all four metrics in one pass over the data (after a min/max scan that
picks the box-sum dtype): each strip also yields the sum of squared differences and the
largest absolute difference of the rows it owns. About 0.16 s for a 3328x4096 12-bit image
on 2 cores, against about 3.3 s for skimage's SSIM alone.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = [
    "SSIM_WINDOW",
    "ImageQuality",
    "achieved_cr",
    "bits_per_pixel",
    "compare",
    "max_abs_error",
    "mse",
    "psnr",
    "ssim",
    "uncompressed_size",
]

IntImage = npt.NDArray[np.integer[Any]]
_Array = npt.NDArray[Any]
_T = TypeVar("_T")
_R = TypeVar("_R")

#: PSNR reported for an exact copy (the seed paper's convention for an infinite PSNR).
EXACT_COPY_PSNR_DB = 100.0

SSIM_WINDOW = 7  # skimage's default uniform window; smaller planes have no SSIM
_WIN = SSIM_WINDOW
_HALO = _WIN - 1
_N = _WIN * _WIN
_K1 = 0.01
_K2 = 0.03
_MAX_WORKERS = 8
_STRIP_BYTES = 1 << 21  # target size of a strip's stacked box-sum input (fits in L2 cache)
_MIN_STRIP_ROWS = 8
_MIN_TASK_ROWS = 32  # fewer window rows than this per thread is not worth a thread
_CHUNK_ELEMENTS = 1 << 18  # pixels per chunk of the difference statistics


@dataclass(frozen=True, slots=True)
class ImageQuality:
    """Quality of a decoded image against its reference."""

    psnr_db: float
    ssim: float | None  # None where the image is smaller than the SSIM window
    mse: float
    max_abs_error: int


# --------------------------------------------------------------------------- sizes and ratios


def uncompressed_size(
    rows: int, columns: int, samples_per_pixel: int, frames: int, bits_allocated: int
) -> int:
    """Bytes of native pixel data: rows*columns*samples*frames*bits_allocated/8.

    For bits_allocated 1 the bits of the whole frame set are packed, so the count is rounded
    up to whole bytes once (DICOM then pads the element to an even length; that pad byte is
    not counted).
    """
    for name, value in (
        ("rows", rows),
        ("columns", columns),
        ("samples_per_pixel", samples_per_pixel),
        ("frames", frames),
        ("bits_allocated", bits_allocated),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    bits = rows * columns * samples_per_pixel * frames * bits_allocated
    return (bits + 7) // 8


def achieved_cr(uncompressed_bytes: int, compressed_bytes: int) -> float:
    """Compression ratio uncompressed/compressed; ValueError unless both are positive."""
    if uncompressed_bytes <= 0:
        raise ValueError(f"uncompressed_bytes must be positive, got {uncompressed_bytes}")
    if compressed_bytes <= 0:
        raise ValueError(f"compressed_bytes must be positive, got {compressed_bytes}")
    return uncompressed_bytes / compressed_bytes


def bits_per_pixel(compressed_bytes: int, pixels: int) -> float:
    """Compressed bits per pixel, pixels = rows*columns*frames (all samples of a pixel together)."""
    if compressed_bytes <= 0:
        raise ValueError(f"compressed_bytes must be positive, got {compressed_bytes}")
    if pixels <= 0:
        raise ValueError(f"pixels must be positive, got {pixels}")
    return 8.0 * compressed_bytes / pixels


# --------------------------------------------------------------------------- error metrics


def mse(ref: IntImage, test: IntImage) -> float:
    """Mean squared error over all pixels and samples."""
    _check_pair(ref, test)
    sse, _ = _diff_stats(ref, test)
    return sse / ref.size


def max_abs_error(ref: IntImage, test: IntImage) -> int:
    """Largest absolute pixel difference."""
    _check_pair(ref, test)
    _, peak_error = _diff_stats(ref, test)
    return peak_error


def psnr(ref: IntImage, test: IntImage, bits_stored: int) -> float:
    """PSNR in dB, 10*log10(peak**2/MSE) with peak = 2**bits_stored - 1; 100.0 for an exact copy."""
    peak = _peak(bits_stored)
    return _psnr_from_mse(mse(ref, test), peak)


def ssim(ref: IntImage, test: IntImage, bits_stored: int, samples_per_pixel: int = 1) -> float:
    """Mean SSIM, equal to skimage's structural_similarity with data_range 2**bits_stored - 1.

    Multi-frame images give the mean over frames, colour images the mean over samples.
    """
    value = compare(ref, test, bits_stored=bits_stored, samples_per_pixel=samples_per_pixel).ssim
    assert value is not None  # compare raises for planes smaller than the window
    return value


def compare(
    ref: IntImage, test: IntImage, *, bits_stored: int, samples_per_pixel: int = 1
) -> ImageQuality:
    """PSNR, SSIM, MSE and max error of ``test`` against ``ref`` in one pass over the data."""
    peak = _peak(bits_stored)
    ref_planes, test_planes = _planes(ref, test, samples_per_pixel)
    acc = _accumulator_dtype(ref, test)
    c1 = (_K1 * peak) ** 2 * _N * _N
    c2 = (_K2 * peak) ** 2 * _N * (_N - 1)
    tasks = _ssim_tasks(ref_planes, test_planes)
    results = _run(lambda task: _ssim_task(task, acc, c1, c2), tasks)

    plane_sums = [0.0] * len(ref_planes)
    sse: int | float = 0
    peak_error = 0
    for task, (ssim_sum, task_sse, task_peak) in zip(tasks, results, strict=True):
        plane_sums[task.plane] += ssim_sum
        sse += task_sse
        peak_error = max(peak_error, task_peak)
    rows, cols = ref_planes[0].shape
    windows = (rows - _HALO) * (cols - _HALO)
    mean_ssim = math.fsum(plane_sums) / (windows * len(plane_sums))
    mse_value = sse / ref.size
    return ImageQuality(
        psnr_db=_psnr_from_mse(mse_value, peak),
        ssim=mean_ssim,
        mse=mse_value,
        max_abs_error=peak_error,
    )


# --------------------------------------------------------------------------- helpers


def _peak(bits_stored: int) -> int:
    if not 1 <= bits_stored <= 32:
        raise ValueError(f"bits_stored must be 1..32, got {bits_stored}")
    return int(2**bits_stored - 1)


def _psnr_from_mse(mse_value: float, peak: int) -> float:
    if mse_value == 0:
        return EXACT_COPY_PSNR_DB
    return 10.0 * math.log10(peak * peak / mse_value)


def _check_pair(ref: IntImage, test: IntImage) -> None:
    if ref.shape != test.shape:
        raise ValueError(f"reference and test images differ in shape: {ref.shape} vs {test.shape}")
    for name, array in (("reference", ref), ("test", test)):
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
            raise TypeError(f"{name} image must be of an integer dtype, got {array.dtype}")
    if ref.size == 0:
        raise ValueError(f"images are empty: shape {ref.shape}")


def _planes(
    ref: IntImage, test: IntImage, samples_per_pixel: int
) -> tuple[list[_Array], list[_Array]]:
    """Split both images into their 2D (rows, cols) planes, one per frame and sample."""
    _check_pair(ref, test)
    if samples_per_pixel < 1:
        raise ValueError(f"samples_per_pixel must be positive, got {samples_per_pixel}")
    shape = ref.shape
    if samples_per_pixel == 1:
        if ref.ndim not in (2, 3):
            raise ValueError(
                f"expected (rows, cols) or (frames, rows, cols) for 1 sample per pixel, "
                f"got shape {shape}"
            )
        ref4 = ref.reshape((-1, *shape[-2:], 1))
        test4 = test.reshape((-1, *shape[-2:], 1))
    else:
        if ref.ndim not in (3, 4) or shape[-1] != samples_per_pixel:
            raise ValueError(
                f"expected (rows, cols, {samples_per_pixel}) or (frames, rows, cols, "
                f"{samples_per_pixel}) for {samples_per_pixel} samples per pixel, got shape {shape}"
            )
        ref4 = ref.reshape((-1, *shape[-3:]))
        test4 = test.reshape((-1, *shape[-3:]))
    rows, cols = ref4.shape[1:3]
    if rows < _WIN or cols < _WIN:
        raise ValueError(
            f"SSIM needs images of at least {_WIN}x{_WIN} pixels (its window size), "
            f"got {rows}x{cols} (shape {shape} with {samples_per_pixel} sample(s) per pixel)"
        )
    frames, samples = ref4.shape[0], ref4.shape[3]
    ref_planes = [ref4[f, :, :, s] for f in range(frames) for s in range(samples)]
    test_planes = [test4[f, :, :, s] for f in range(frames) for s in range(samples)]
    return ref_planes, test_planes


def _accumulator_dtype(ref: IntImage, test: IntImage) -> np.dtype[Any]:
    """The narrowest dtype in which the box sums of x*x + y*y over 49 pixels stay exact."""
    largest = max(_largest_magnitude(ref), _largest_magnitude(test))
    window_sq = 2 * _N * largest * largest
    if window_sq < 2**31:
        return np.dtype(np.int32)
    if largest < 2**20:  # also keeps a strip's sum of squared differences within int64
        return np.dtype(np.int64)
    return np.dtype(np.float64)  # beyond any DICOM bit depth; rounding ~1e-16 relative


def _largest_magnitude(array: IntImage) -> int:
    high = int(array.max())
    if np.issubdtype(array.dtype, np.signedinteger):
        return max(high, -int(array.min()))
    return high


def _workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_WORKERS))


def _run(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """``[fn(item) for item in items]``, on a thread pool when there is more than one item."""
    workers = min(_workers(), len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="metrics") as pool:
        return list(pool.map(fn, items))


def _split(count: int, parts: int) -> list[tuple[int, int]]:
    """``range(count)`` cut into ``parts`` contiguous (start, stop) pieces of near-equal size."""
    bounds = [count * k // parts for k in range(parts + 1)]
    return list(itertools.pairwise(bounds))


# --------------------------------------------------------------------------- differences


def _diff_stats(ref: IntImage, test: IntImage) -> tuple[int | float, int]:
    """Sum of squared differences and largest absolute difference, in row chunks on threads.

    Exact for inputs of up to 16 bits (int32 differences, int64 squares); wider inputs square
    their int64 differences in float64.
    """
    x = ref.reshape(-1, ref.shape[-1]) if ref.ndim > 1 else ref.reshape(1, -1)
    y = test.reshape(x.shape)
    wide = max(ref.dtype.itemsize, test.dtype.itemsize) > 2
    chunk_rows = max(1, _CHUNK_ELEMENTS // x.shape[1])
    parts = max(1, min(_workers(), x.shape[0] // chunk_rows))

    def part(bounds: tuple[int, int]) -> tuple[int | float, int]:
        start, stop = bounds
        diff = np.empty((chunk_rows, x.shape[1]), np.int64 if wide else np.int32)
        square = np.empty(diff.shape, np.float64 if wide else np.int64)
        sse: int | float = 0
        peak = 0
        for top in range(start, stop, chunk_rows):
            rows = min(chunk_rows, stop - top)
            d = np.subtract(
                x[top : top + rows],
                y[top : top + rows],
                out=diff[:rows],
                dtype=diff.dtype,
                casting="unsafe",
            )
            peak = max(peak, int(d.max()), -int(d.min()))
            sse += np.multiply(d, d, out=square[:rows], dtype=square.dtype).sum().item()
        return sse, peak

    results = _run(part, _split(x.shape[0], parts))
    return sum(r[0] for r in results), max(r[1] for r in results)


# --------------------------------------------------------------------------- SSIM


@dataclass(frozen=True, slots=True)
class _Task:
    """The windows whose top row lies in [start, stop) of one 2D plane."""

    plane: int
    ref: _Array
    test: _Array
    start: int
    stop: int


def _ssim_tasks(ref_planes: list[_Array], test_planes: list[_Array]) -> list[_Task]:
    """Cut every plane into at most one band of window rows per worker."""
    workers = _workers()
    tasks: list[_Task] = []
    for index, (ref, test) in enumerate(zip(ref_planes, test_planes, strict=True)):
        window_rows = ref.shape[0] - _HALO
        parts = max(1, min(workers, window_rows // _MIN_TASK_ROWS))
        tasks += [
            _Task(index, ref, test, start, stop) for start, stop in _split(window_rows, parts)
        ]
    return tasks


def _ssim_task(
    task: _Task, acc: np.dtype[Any], c1: float, c2: float
) -> tuple[float, int | float, int]:
    """SSIM sum over the task's windows, plus the SSE and peak error of the rows it owns.

    A task owns the input rows [start, stop), and the last task of a plane also the halo rows
    below its last window row, so every pixel is counted once.
    """
    rows, cols = task.ref.shape
    last_window_row = rows - _HALO
    strip_rows = max(_MIN_STRIP_ROWS, _STRIP_BYTES // (4 * cols * acc.itemsize) - _HALO)
    work = _Workspace(strip_rows, cols, acc)
    ssim_sum = 0.0
    sse: int | float = 0
    peak = 0
    for top in range(task.start, task.stop, strip_rows):
        bottom = min(top + strip_rows, task.stop)
        owned = bottom - top + (_HALO if bottom == last_window_row else 0)
        strip = slice(top, bottom + _HALO)
        strip_sum, strip_sse, strip_peak = work.strip(
            task.ref[strip], task.test[strip], owned, c1, c2
        )
        ssim_sum += strip_sum
        sse += strip_sse
        peak = max(peak, strip_peak)
    return ssim_sum, sse, peak


class _Workspace:
    """Buffers for the strips of one task, reused from strip to strip to stay in cache."""

    def __init__(self, strip_rows: int, cols: int, acc: np.dtype[Any]) -> None:
        in_rows = strip_rows + _HALO
        self.stack = np.empty((4, in_rows, cols), acc)  # x, y, x*x + y*y, x*y
        self.scratch = np.empty((4, in_rows, cols), acc)
        self.vertical = np.empty((4, in_rows, cols), acc)
        self.box = np.empty((4, strip_rows, cols - _HALO), acc)
        self.sums = self.box if acc == np.float64 else np.empty(self.box.shape, np.float64)
        self.terms = np.empty((2, strip_rows, cols - _HALO), np.float64)

    def strip(
        self, x: _Array, y: _Array, owned: int, c1: float, c2: float
    ) -> tuple[float, int | float, int]:
        """(SSIM sum over the windows, SSE, peak error of the first ``owned`` rows) of a strip."""
        in_rows = x.shape[0]
        out_rows = in_rows - _HALO
        stack = self.stack[:, :in_rows]
        xs, ys, squares, products = stack
        np.copyto(xs, x, casting="unsafe")
        np.copyto(ys, y, casting="unsafe")

        diff = np.subtract(xs[:owned], ys[:owned], out=self.scratch[0, :owned])
        peak = max(int(diff.max()), -int(diff.min()))
        np.multiply(diff, diff, out=diff)  # fits: see _accumulator_dtype
        sse = diff.sum(dtype=np.float64 if diff.dtype == np.float64 else np.int64).item()

        np.multiply(xs, ys, out=products)
        np.multiply(xs, xs, out=squares)
        squares += np.multiply(ys, ys, out=self.scratch[0, :in_rows])
        box = self.box[:, :out_rows]
        _box_sums(stack, self.scratch[:, :in_rows], self.vertical[:, :in_rows], box)
        sums = self.sums[:, :out_rows]
        if sums is not box:
            np.copyto(sums, box)

        # SSIM of every window from its sums (see the module docstring), in place; the
        # numerator's factor 4 is taken out of the sum: (2a)(2b) = 4ab, exact in binary
        sx, sy, sq, sp = sums
        lum, den = self.terms[:, :out_rows]
        np.multiply(sx, sy, out=lum)  # sx*sy
        np.multiply(sx, sx, out=den)
        den += np.multiply(sy, sy, out=sx)  # sx*sx + sy*sy
        sp *= _N
        sp -= lum
        sp += c2 / 2  # N*sp - sx*sy + c2/2
        lum += c1 / 2  # sx*sy + c1/2
        lum *= sp
        sq *= _N
        sq -= den
        sq += c2  # N*sq - sx*sx - sy*sy + c2
        den += c1
        den *= sq
        lum /= den
        return 4.0 * float(lum.sum()), sse, peak


def _box_sums(a: _Array, scratch: _Array, vertical: _Array, out: _Array) -> None:
    """7x7 window sums over every valid window of each plane of ``a`` (planes, rows, cols).

    Writes ``out`` (planes, rows - 6, cols - 6); ``scratch`` and ``vertical`` are buffers
    shaped like ``a``, which is overwritten. Seven terms in four additions per axis:
    s2[i] = a[i] + a[i+1], s4[i] = s2[i] + s2[i+2], s7[i] = s4[i] + s2[i+4] + a[i+6].
    """
    rows, cols = a.shape[1:]
    n, m = rows - _HALO, cols - _HALO
    s2 = np.add(a[:, :-1], a[:, 1:], out=scratch[:, : rows - 1])
    s4 = np.add(s2[:, :-2], s2[:, 2:], out=vertical[:, : rows - 3])
    s7 = s4[:, :n]
    s7 += s2[:, 4 : n + 4]
    s7 += a[:, _HALO:]
    s2 = np.add(s7[..., :-1], s7[..., 1:], out=scratch[:, :n, : cols - 1])
    s4 = np.add(s2[..., :-2], s2[..., 2:], out=a[:, :n, : cols - 3])
    np.add(s4[..., :m], s2[..., 4 : m + 4], out=out)
    out += s7[..., _HALO:]
