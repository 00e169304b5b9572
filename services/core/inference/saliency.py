"""Occlusion sensitivity: saliency for models whose graph has no Grad-CAM output.

A patch (by default 1/8 of each side of the input, moved by half a patch) is filled with the
image's mean and the model run again; where hiding the patch lowers the malignancy probability,
the patch mattered: ``drop = max(0, p_original - p_occluded)``. Each pixel gets the mean drop of
the patches that cover it, and the map is divided by its maximum (all zero when nothing
mattered). Forward passes only, so it works for any graph; it costs one pass per patch position
(about 15 x 15 per input at the default settings).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from services.core.errors import InvalidInput, InvalidParameter

F32 = npt.NDArray[np.float32]
Forward = Callable[[F32], npt.NDArray[Any]]

DEFAULT_PATCH_FRACTION = 1 / 8


def patch_positions(size: int, patch: int, stride: int) -> list[int]:
    """Start offsets along one side so that patches of ``patch`` cover ``[0, size)``."""
    if patch >= size:
        return [0]
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def occlusion_saliency(
    forward: Forward,
    images: npt.NDArray[Any],
    *,
    baseline: npt.NDArray[Any] | None = None,
    patch_fraction: float = DEFAULT_PATCH_FRACTION,
    stride_fraction: float = 0.5,
    fill: float | str = "mean",
    batch_size: int = 8,
) -> F32:
    """Saliency ``[N, H, W]`` in [0, 1] for inputs ``[N, 1, H, W]``.

    ``forward`` maps a batch ``[k, 1, H, W]`` to probabilities ``[k]``; ``baseline`` are the
    probabilities of the unoccluded ``images`` when already known. ``fill`` is ``"mean"`` (the
    image's mean) or a number. The patch is ``patch_fraction`` of each side (at least one pixel)
    and moves by ``stride_fraction`` of the patch.
    """
    batch = np.asarray(images, dtype=np.float32)
    if batch.ndim != 4 or batch.shape[1] != 1:
        raise InvalidInput(f"occlusion needs inputs [N, 1, H, W], got {list(batch.shape)}")
    if not 0.0 < patch_fraction <= 1.0:
        raise InvalidParameter(f"patch_fraction must be in (0, 1], got {patch_fraction!r}")
    if not 0.0 < stride_fraction <= 1.0:
        raise InvalidParameter(f"stride_fraction must be in (0, 1], got {stride_fraction!r}")
    if isinstance(fill, str) and fill != "mean":
        raise InvalidParameter(f"fill must be 'mean' or a number, got {fill!r}")
    if batch_size < 1:
        raise InvalidParameter(f"batch size must be a positive integer, got {batch_size!r}")
    n, _, height, width = batch.shape
    if baseline is None:
        base = _probabilities(forward, batch, n)
    else:
        base = np.asarray(baseline, dtype=np.float32).reshape(-1)
        if base.shape[0] != n:
            raise InvalidInput(f"{base.shape[0]} baseline probabilities for {n} inputs")

    ph = max(1, round(height * patch_fraction))
    pw = max(1, round(width * patch_fraction))
    ys = patch_positions(height, ph, max(1, round(ph * stride_fraction)))
    xs = patch_positions(width, pw, max(1, round(pw * stride_fraction)))
    locations = [(y, x) for y in ys for x in xs]

    coverage = np.zeros((height, width), dtype=np.float32)
    for y, x in locations:
        coverage[y : y + ph, x : x + pw] += 1.0

    out = np.zeros((n, height, width), dtype=np.float32)
    for i in range(n):
        image = batch[i, 0]
        value = float(image.mean()) if fill == "mean" else float(fill)
        drops = np.empty(len(locations), dtype=np.float32)
        for start, chunk in _occluded(image, locations, ph, pw, value, batch_size):
            probs = _probabilities(forward, chunk, chunk.shape[0])
            drops[start : start + len(probs)] = np.maximum(0.0, base[i] - probs)
        heat = np.zeros((height, width), dtype=np.float32)
        for (y, x), drop in zip(locations, drops, strict=True):
            heat[y : y + ph, x : x + pw] += drop
        heat /= coverage
        peak = float(heat.max())
        if peak > 0.0:
            out[i] = heat / np.float32(peak)
    return out


def _occluded(
    image: F32,
    locations: list[tuple[int, int]],
    ph: int,
    pw: int,
    value: float,
    batch_size: int,
) -> Iterator[tuple[int, F32]]:
    """Batches of copies of ``image``, each with one patch filled with ``value``."""
    for start in range(0, len(locations), batch_size):
        part = locations[start : start + batch_size]
        chunk = np.repeat(image[np.newaxis, np.newaxis], len(part), axis=0)
        for k, (y, x) in enumerate(part):
            chunk[k, 0, y : y + ph, x : x + pw] = value
        yield start, chunk


def _probabilities(forward: Forward, batch: F32, n: int) -> F32:
    probs = np.asarray(forward(batch), dtype=np.float32).reshape(-1)
    if probs.shape[0] != n:
        raise InvalidInput(f"the model returned {probs.shape[0]} probabilities for {n} inputs")
    return probs
