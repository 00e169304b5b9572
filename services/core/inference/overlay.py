"""Saliency overlays: the windowed mammogram with a heat map and a colour bar, as PNG.

The greyscale image is windowed with the dataset's WindowCenter/WindowWidth when given, else
between the 0.5 and 99.5 percentiles of the non-background (breast) pixels; MONOCHROME1 is shown
inverted, as a viewer would. The heat map (a jet-like colour map: blue - cyan - yellow - red) is
blended over it with an opacity that grows with the saliency, up to :data:`MAX_ALPHA`; where
the saliency is below :data:`ALPHA_FLOOR` the image is left untouched. A colour bar labelled 0
and 1 is added on the right, :func:`colorbar_width` pixels wide.
"""

from __future__ import annotations

import functools
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from services.core.dicom.io import atomic_output
from services.core.errors import InvalidInput, InvalidParameter
from services.core.inference.preprocess import resize

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

MAX_ALPHA = 0.5
ALPHA_FLOOR = 0.1
PREVIEW_MAX_SIDE = 512
_MIN_BAR = 32
_BAR_FRACTION = 0.06
_BACKGROUND_FRACTION = 0.05  # of the value range above the darkest pixel: air
_SAMPLE_PIXELS = 1_000_000


def colorbar_width(rows: int) -> int:
    """Width in pixels of the colour bar added to an image ``rows`` high."""
    return max(_MIN_BAR, round(rows * _BAR_FRACTION))


def jet(values: npt.NDArray[Any]) -> F32:
    """Jet-like colour map: [0, 1] -> RGB in [0, 1] (dark blue, cyan, yellow, dark red)."""
    t = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., np.newaxis]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # red, green, blue
    rgb: F32 = np.clip(1.5 - np.abs(4.0 * (t - centres)), 0.0, 1.0).astype(np.float32)
    return rgb


def auto_window(
    pixels: npt.NDArray[Any], *, bits_stored: int, photometric: str = "MONOCHROME2"
) -> tuple[float, float]:
    """(center, width) spanning the 0.5-99.5 percentiles of the non-background pixels."""
    step = max(1, math.isqrt(max(1, pixels.size // _SAMPLE_PIXELS)))
    sample = np.asarray(pixels[::step, ::step], dtype=np.float64).ravel()
    if sample.size == 0:
        raise InvalidInput("cannot window an empty image")
    peak = float((1 << bits_stored) - 1)
    shown = peak - sample if photometric == "MONOCHROME1" else sample  # tissue bright
    low, high = float(shown.min()), float(shown.max())
    tissue = sample[shown > low + _BACKGROUND_FRACTION * (high - low)]
    if tissue.size < max(16, sample.size // 100):
        tissue = sample
    lo, hi = (float(v) for v in np.percentile(tissue, [0.5, 99.5]))
    if hi - lo < 1.0:
        hi = lo + 1.0
    return (lo + hi) / 2.0, hi - lo


def display_grey(
    pixels: npt.NDArray[Any],
    *,
    bits_stored: int,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
) -> F32:
    """Stored values to display brightness in [0, 1]: windowed, MONOCHROME1 inverted."""
    if pixels.ndim != 2:
        raise InvalidInput(f"an overlay needs one greyscale frame, got shape {pixels.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InvalidInput(f"an overlay needs a MONOCHROME1/2 image, got {photometric}")
    if window is None:
        window = auto_window(pixels, bits_stored=bits_stored, photometric=photometric)
    center, width = (float(v) for v in window)
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise InvalidParameter(f"window (center {center}, width {width}) is not usable")
    lo = center - width / 2.0
    grey = (pixels.astype(np.float32) - np.float32(lo)) / np.float32(width)
    grey = np.clip(grey, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        grey = np.float32(1.0) - grey
    out: F32 = grey.astype(np.float32, copy=False)
    return out


def render_overlay(
    pixels: npt.NDArray[Any],
    saliency: npt.NDArray[Any],
    *,
    bits_stored: int,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
) -> Image.Image:
    """RGB image: the windowed view, the heat map over it, and the colour bar on the right.

    ``saliency`` in [0, 1]; when its shape differs from the image's it is scaled to it.
    """
    grey = display_grey(pixels, bits_stored=bits_stored, photometric=photometric, window=window)
    return _compose(grey, _fit(saliency, grey.shape))


def render_preview(
    pixels: npt.NDArray[Any],
    saliency: npt.NDArray[Any],
    *,
    bits_stored: int,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    max_side: int = PREVIEW_MAX_SIDE,
) -> Image.Image:
    """:func:`render_overlay` scaled down so that neither side (colour bar included) exceeds
    ``max_side``; the window is chosen on the full-resolution image."""
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 2 * _MIN_BAR:
        raise InvalidParameter(f"preview max side must be an integer >= {2 * _MIN_BAR} px")
    grey = display_grey(pixels, bits_stored=bits_stored, photometric=photometric, window=window)
    rows, cols = grey.shape
    new_rows, new_cols = _preview_size(rows, cols, max_side)
    if (new_rows, new_cols) != (rows, cols):
        grey = np.clip(resize(grey, new_rows, new_cols), 0.0, 1.0)
    # the coarse map goes straight to the preview grid (never through the full-size one)
    return _compose(grey, np.clip(_fit(saliency, grey.shape), 0.0, 1.0))


def _preview_size(rows: int, cols: int, max_side: int) -> tuple[int, int]:
    scale = 1.0
    for _ in range(200):
        new_rows = max(1, math.floor(rows * scale))
        new_cols = max(1, math.floor(cols * scale))
        if new_rows <= max_side and new_cols + colorbar_width(new_rows) <= max_side:
            return new_rows, new_cols
        scale = min(
            scale * 0.98,
            max_side / rows,
            (max_side - colorbar_width(min(rows, max_side))) / cols,
        )
    raise InvalidParameter(f"cannot fit a {cols}x{rows} image in a {max_side} px preview")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=4)
    return buffer.getvalue()


def write_png(path: Path, image: Image.Image) -> None:
    """Write ``image`` as PNG atomically: the file appears complete or not at all."""
    data = png_bytes(image)
    with atomic_output(Path(path)) as fh:
        fh.write(data)


# ---------------------------------------------------------------------- composition


def _fit(saliency: npt.NDArray[Any], shape: tuple[int, ...]) -> F32:
    sal = np.nan_to_num(np.asarray(saliency, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    if sal.ndim != 2:
        raise InvalidInput(f"a saliency map must be 2-D, got shape {sal.shape}")
    if sal.shape != shape:
        sal = resize(sal, shape[0], shape[1])
    clipped: F32 = np.clip(sal, 0.0, 1.0)
    return clipped


def _compose(grey: F32, saliency: F32) -> Image.Image:
    rows, cols = grey.shape
    bar = colorbar_width(rows)
    canvas = np.zeros((rows, cols + bar, 3), dtype=np.uint8)
    canvas[:, :cols] = _blend_table()[_to_u8(grey).astype(np.uint16) * 256 + _to_u8(saliency)]

    pad = max(2, rows // 20)
    top, bottom = pad, max(pad + 1, rows - pad)
    left, right = cols + max(2, bar // 6), cols + max(4, bar // 2)
    ramp = np.linspace(1.0, 0.0, bottom - top, dtype=np.float32)  # 1 at the top
    canvas[top:bottom, left:right] = _to_u8(jet(ramp))[:, np.newaxis, :]

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = _font(max(8, min(bar // 2, rows // 6)))
    x = right + 2
    white = (255, 255, 255)
    _, t1, _, _ = draw.textbbox((0, 0), "1", font=font)
    _, _, _, b0 = draw.textbbox((0, 0), "0", font=font)
    draw.text((x, top - t1), "1", fill=white, font=font)  # glyph top level with the bar's
    draw.text((x, bottom - b0), "0", fill=white, font=font)  # glyph bottom level with it
    return image


@functools.cache
def _blend_table() -> U8:
    """[65536, 3]: the displayed colour of grey level g (0-255) under saliency level s (0-255)
    at index ``g * 256 + s``; a lookup is much faster than blending every pixel."""
    levels = np.linspace(0.0, 1.0, 256, dtype=np.float32)
    alpha = MAX_ALPHA * np.clip((levels - ALPHA_FLOOR) / (1.0 - ALPHA_FLOOR), 0.0, 1.0)
    grey = levels[:, np.newaxis, np.newaxis]  # [g, 1, 1]
    a = alpha[np.newaxis, :, np.newaxis]  # [1, s, 1]
    table = grey * (1.0 - a) + jet(levels)[np.newaxis, :, :] * a  # [g, s, 3]
    out = _to_u8(table.reshape(-1, 3))
    out.flags.writeable = False
    return out


def _to_u8(values: npt.NDArray[Any]) -> U8:
    scaled = np.clip(np.asarray(values, dtype=np.float32) * 255.0 + 0.5, 0.0, 255.0)
    out: U8 = scaled.astype(np.uint8)
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()
