"""Tests of the saliency overlays (services/core/inference/overlay.py)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from services.core.errors import InvalidInput, InvalidParameter
from services.core.inference.breasts import group_breasts
from services.core.inference.overlay import (
    ALPHA_FLOOR,
    auto_window,
    colorbar_width,
    display_grey,
    jet,
    png_bytes,
    render_overlay,
    render_preview,
    write_png,
)
from services.lab.phantom import PhantomConfig, generate_study

ROWS, COLS = 120, 90


def _overlay_png(pixels: np.ndarray, saliency: np.ndarray, **kwargs: Any) -> bytes:
    return png_bytes(render_overlay(pixels, saliency, **kwargs))


def _preview_png(pixels: np.ndarray, saliency: np.ndarray, **kwargs: Any) -> bytes:
    return png_bytes(render_preview(pixels, saliency, **kwargs))


def _image() -> npt.NDArray[np.uint16]:
    """12-bit: air (near 0) on the right, a 'breast' from 1000 to 3000 on the left."""
    img = np.full((ROWS, COLS), 20, dtype=np.uint16)
    img[:, :60] = np.linspace(1000, 3000, ROWS, dtype=np.uint16)[:, np.newaxis]
    return img


def _saliency() -> npt.NDArray[np.float32]:
    sal = np.zeros((ROWS, COLS), dtype=np.float32)
    sal[40:60, 10:30] = 1.0
    return sal


def _decode(data: bytes) -> npt.NDArray[np.uint8]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


def test_overlay_png_size_and_colours() -> None:
    rgb = _decode(_overlay_png(_image(), _saliency(), bits_stored=12))
    assert rgb.shape == (ROWS, COLS + colorbar_width(ROWS), 3)
    hot = rgb[50, 20].astype(int)
    assert hot[0] - hot[2] > 40  # saliency 1: red heat over the grey
    for y, x in ((10, 20), (100, 45), (5, 80)):  # saliency 0: plain grey
        r, g, b = rgb[y, x]
        assert r == g == b
    bar = rgb[:, COLS:]
    assert bar.reshape(-1, 3).max(axis=0).min() > 100  # the colour bar is coloured...
    assert (bar == 255).all(axis=2).any()  # ...and labelled in white


def test_colour_bar_runs_from_blue_to_red() -> None:
    rgb = np.asarray(render_overlay(_image(), _saliency(), bits_stored=12))
    bar = rgb[:, COLS:]
    column = int(np.argmax((bar.astype(int).sum(axis=2) > 0).sum(axis=0)))  # the strip
    strip = bar[:, column].astype(int)
    coloured = np.flatnonzero(strip.sum(axis=1) > 0)
    top, bottom = strip[coloured[0]], strip[coloured[-1]]
    assert top[0] > top[2]  # 1 at the top: red
    assert bottom[2] > bottom[0]  # 0 at the bottom: blue


def test_alpha_grows_with_saliency() -> None:
    grey = np.full((ROWS, COLS), 2000, dtype=np.uint16)
    sal = np.tile(np.linspace(0, 1, COLS, dtype=np.float32), (ROWS, 1))
    rgb = np.asarray(render_overlay(grey, sal, bits_stored=12, window=(2048, 4096))).astype(int)
    spread = rgb[60, :COLS].max(axis=1) - rgb[60, :COLS].min(axis=1)
    low = sal[0] < ALPHA_FLOOR
    assert (spread[low] == 0).all()  # below the floor the image is untouched
    assert spread[-1] > 60


def test_preview_max_side() -> None:
    big = np.tile(_image(), (10, 10))  # 1200 x 900
    sal = np.tile(_saliency(), (10, 10))
    for max_side in (512, 200):
        rgb = _decode(_preview_png(big, sal, bits_stored=12, max_side=max_side))
        assert max(rgb.shape[:2]) <= max_side
        assert max(rgb.shape[:2]) >= max_side - 8  # not needlessly small
        assert rgb.shape[1] - colorbar_width(rgb.shape[0]) < rgb.shape[0]  # aspect kept
    small = _decode(_preview_png(_image(), _saliency(), bits_stored=12))
    assert small.shape[:2] == (ROWS, COLS + colorbar_width(ROWS))  # never enlarged
    with pytest.raises(InvalidParameter, match="max side"):
        _preview_png(big, sal, bits_stored=12, max_side=10)


def test_window_given_and_monochrome1() -> None:
    img = _image()
    grey = display_grey(img, bits_stored=12, window=(2000.0, 1000.0))  # 1500 .. 2500
    assert grey[0, 0] == 0.0 and grey[-1, 0] == 1.0
    inverted = display_grey(img, bits_stored=12, photometric="MONOCHROME1", window=(2000, 1000))
    np.testing.assert_allclose(inverted, 1.0 - grey)
    mono1 = np.asarray(render_overlay(img, _saliency(), bits_stored=12, photometric="MONOCHROME1"))
    mono2 = np.asarray(render_overlay(img, _saliency(), bits_stored=12))
    assert mono1[-1, 0, 0] < 20 < 235 < mono2[-1, 0, 0]  # brightest stored value shown dark


def test_auto_window_ignores_background() -> None:
    center, width = auto_window(_image(), bits_stored=12)
    assert 950 < center - width / 2 < 1100 and 2900 < center + width / 2 < 3050
    # MONOCHROME1: the background is the bright end (air is 4095).
    mono1 = 4095 - _image()
    center1, width1 = auto_window(mono1, bits_stored=12, photometric="MONOCHROME1")
    assert 950 < 4095 - (center1 + width1 / 2) < 1100
    flat = np.full((10, 10), 7, dtype=np.uint16)
    assert auto_window(flat, bits_stored=12)[1] >= 1.0


def test_saliency_of_another_size_is_scaled() -> None:
    coarse = np.zeros((12, 9), dtype=np.float32)
    coarse[4:6, 1:3] = 1.0  # rows 40-60, cols 10-30 of the image
    rgb = np.asarray(render_overlay(_image(), coarse, bits_stored=12)).astype(int)
    assert rgb[50, 20, 0] - rgb[50, 20, 2] > 40
    assert rgb[100, 45, 0] == rgb[100, 45, 2]


def test_bad_inputs() -> None:
    with pytest.raises(InvalidInput, match="one greyscale frame"):
        render_overlay(np.zeros((2, 4, 4)), np.zeros((4, 4)), bits_stored=12)
    with pytest.raises(InvalidInput, match="MONOCHROME1/2"):
        render_overlay(np.zeros((4, 4)), np.zeros((4, 4)), bits_stored=8, photometric="RGB")
    with pytest.raises(InvalidParameter, match="window"):
        display_grey(np.zeros((4, 4)), bits_stored=8, window=(10.0, 0.0))
    with pytest.raises(InvalidInput, match="2-D"):
        render_overlay(np.zeros((4, 4)), np.zeros((1, 4, 4)), bits_stored=8)


def test_jet() -> None:
    colours = jet(np.array([0.0, 0.5, 1.0]))
    assert colours.shape == (3, 3)
    assert colours[0, 2] > colours[0, 0]  # blue
    assert colours[1, 1] == 1.0  # green in the middle
    assert colours[2, 0] > colours[2, 2]  # red


def test_write_png_atomic(tmp_path: Path) -> None:
    image = render_overlay(_image(), _saliency(), bits_stored=12)
    target = tmp_path / "overlay.png"
    write_png(target, image)
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left
    np.testing.assert_array_equal(np.asarray(Image.open(target)), np.asarray(image))


def test_phantom_overlay_with_dataset_window() -> None:
    study = generate_study(1, seed=2, config=PhantomConfig(width=256, height=320))
    breast = group_breasts([(f"{k}.dcm", ds) for k, ds in study.datasets.items()])[1]
    view = breast.views["MLO"]
    sal = np.zeros((view.rows, view.cols), dtype=np.float32)
    sal[100:140, 150:200] = 1.0
    rgb = _decode(
        _overlay_png(
            view.pixels,
            sal,
            bits_stored=view.bits_stored,
            photometric=view.photometric,
            window=view.window,
        )
    )
    assert rgb.shape == (320, 256 + colorbar_width(320), 3)
    assert rgb[120, 170, 0] > rgb[120, 170, 2]
