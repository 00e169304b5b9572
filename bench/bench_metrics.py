"""Time services.core.metrics on a mammogram-sized image: median of 5 runs each.

Run: .venv/bin/python bench/bench_metrics.py
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.core import metrics

ROWS, COLS, BITS = 3328, 4096, 12
RUNS = 5


def make_images(seed: int = 0) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16]]:
    """A 12-bit mammogram-like image (zero background, textured breast) and a noisy copy."""
    rng = np.random.default_rng(seed)
    peak = 2**BITS - 1
    r = np.arange(ROWS, dtype=np.float32)[:, None]
    c = np.arange(COLS, dtype=np.float32)[None, :]
    inside = ((r - ROWS / 2) / (ROWS * 0.45)) ** 2 + (c / (COLS * 0.6)) ** 2 < 1
    texture = rng.standard_normal((ROWS // 16, COLS // 16)).astype(np.float32)
    texture = np.kron(texture, np.ones((16, 16), np.float32))
    tissue = 0.55 * peak * np.clip(1 - (c / (COLS * 0.6)) ** 2, 0, 1) + 0.15 * peak * texture
    tissue += rng.normal(0, 20, (ROWS, COLS)).astype(np.float32)
    ref = np.where(inside, np.clip(tissue, 0, peak), 0).astype(np.uint16)
    noise = rng.integers(-12, 13, size=ref.shape, dtype=np.int32)
    test = np.clip(ref.astype(np.int32) + noise, 0, peak).astype(np.uint16)
    return ref, test


def median_seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    times = []
    value = None
    for _ in range(RUNS):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def main() -> None:
    from skimage.metrics import structural_similarity as untyped_ssim

    structural_similarity: Callable[..., Any] = untyped_ssim
    ref, test = make_images()
    print(f"image {ROWS}x{COLS} uint16, {BITS} bits stored, {metrics._workers()} worker thread(s)")
    rows: list[tuple[str, float, Any]] = []
    for name, fn in (
        ("psnr", lambda: metrics.psnr(ref, test, BITS)),
        ("ssim", lambda: metrics.ssim(ref, test, BITS)),
        ("compare (all four)", lambda: metrics.compare(ref, test, bits_stored=BITS)),
        (
            "skimage structural_similarity",
            lambda: structural_similarity(ref, test, data_range=2**BITS - 1),
        ),
    ):
        seconds, value = median_seconds(fn)
        rows.append((name, seconds, value))

    reference = rows[-1][1]
    print(f"{'function':32s} {'median ms':>10s} {'skimage / this':>15s}")
    for name, seconds, _ in rows:
        print(f"{name:32s} {seconds * 1000:10.1f} {reference / seconds:15.1f}x")
    ours, theirs = rows[1][2], rows[-1][2]
    print(f"ssim {ours:.12f} vs skimage {theirs:.12f}: |difference| {abs(ours - theirs):.1e}")
    print(f"compare: {rows[2][2]}")


if __name__ == "__main__":
    main()
