"""Tests of services.core.metrics: sizes and ratios, PSNR/MSE/max error, SSIM against skimage."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import structural_similarity as _untyped_structural_similarity

from services.core import metrics
from services.core.metrics import (
    ImageQuality,
    achieved_cr,
    bits_per_pixel,
    compare,
    max_abs_error,
    mse,
    psnr,
    ssim,
    uncompressed_size,
)

Array = npt.NDArray[Any]
structural_similarity: Callable[..., Any] = _untyped_structural_similarity


def _random(shape: tuple[int, ...], bits: int, seed: int = 0, dtype: Any = np.uint16) -> Array:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**bits, size=shape).astype(dtype)


def _noisy(ref: Array, bits: int, sigma: float, seed: int = 1) -> Array:
    rng = np.random.default_rng(seed)
    noisy = ref.astype(np.int64) + np.rint(rng.normal(0, sigma, ref.shape)).astype(np.int64)
    info = np.iinfo(ref.dtype)
    low = max(info.min, -(2 ** (bits - 1)) if info.min < 0 else 0)
    high = min(info.max, 2**bits - 1)
    result: Array = np.clip(noisy, low, high).astype(ref.dtype)
    return result


def _structured(rows: int, cols: int, bits: int) -> Array:
    """Smooth gradient, a bright disc with a sharp edge and a zero background band."""
    r, c = np.mgrid[0:rows, 0:cols]
    peak = 2**bits - 1
    image = (r * c) / max(1, (rows - 1) * (cols - 1)) * peak * 0.6
    disc = (r - rows / 2) ** 2 + (c - cols / 3) ** 2 < (min(rows, cols) / 4) ** 2
    image[disc] = peak * 0.9
    image[:, : cols // 5] = 0
    result: Array = np.rint(image).astype(np.uint16)
    return result


def _skimage(ref: Array, test: Array, bits: int, **kwargs: Any) -> float:
    return float(structural_similarity(ref, test, data_range=2**bits - 1, **kwargs))


# --------------------------------------------------------------------------- sizes and ratios


def test_uncompressed_size() -> None:
    assert uncompressed_size(3328, 4096, 1, 1, 16) == 3328 * 4096 * 2
    assert uncompressed_size(512, 512, 3, 10, 8) == 512 * 512 * 3 * 10
    # 1-bit data is packed over the whole frame set: 3 frames of 3x3 = 27 bits -> 4 bytes
    assert uncompressed_size(3, 3, 1, 1, 1) == 2
    assert uncompressed_size(3, 3, 1, 3, 1) == 4
    with pytest.raises(ValueError, match="rows must be positive"):
        uncompressed_size(0, 4, 1, 1, 16)
    with pytest.raises(ValueError, match="bits_allocated"):
        uncompressed_size(4, 4, 1, 1, -8)


def test_cr_and_bpp() -> None:
    assert achieved_cr(27_262_976, 1_363_148) == pytest.approx(20.0, rel=1e-6)
    assert achieved_cr(1000, 250) == 4.0
    assert bits_per_pixel(1000, 2000) == 4.0
    assert bits_per_pixel(1_363_148, 3328 * 4096) == pytest.approx(0.8, rel=1e-5)
    for bad in ((0, 10), (10, 0), (-1, 10), (10, -5)):
        with pytest.raises(ValueError, match="must be positive"):
            achieved_cr(*bad)
    with pytest.raises(ValueError, match="pixels must be positive"):
        bits_per_pixel(10, 0)
    with pytest.raises(ValueError, match="compressed_bytes must be positive"):
        bits_per_pixel(0, 10)


# --------------------------------------------------------------------------- error metrics


def test_exact_copy() -> None:
    ref = _random((40, 50), 12)
    quality = compare(ref, ref.copy(), bits_stored=12)
    assert quality == ImageQuality(psnr_db=100.0, ssim=1.0, mse=0.0, max_abs_error=0)
    assert psnr(ref, ref, 12) == 100.0
    assert ssim(ref, ref, 12) == 1.0
    assert mse(ref, ref) == 0.0
    assert max_abs_error(ref, ref) == 0
    assert isinstance(quality.max_abs_error, int)


def test_psnr_by_hand() -> None:
    ref = np.zeros((8, 8), np.uint16)
    test = ref.copy()
    k = 5
    test[3, 4] = k
    expected_mse = k * k / 64
    expected_psnr = 10 * math.log10(4095**2 / expected_mse)
    assert mse(ref, test) == expected_mse
    assert max_abs_error(ref, test) == k
    assert psnr(ref, test, 12) == pytest.approx(expected_psnr, abs=1e-12)
    assert psnr(ref, test, 16) == pytest.approx(10 * math.log10(65535**2 / expected_mse))
    quality = compare(ref, test, bits_stored=12)
    assert quality.psnr_db == pytest.approx(expected_psnr, abs=1e-12)
    assert quality.mse == expected_mse
    assert quality.max_abs_error == k


def test_signed_int16_without_overflow() -> None:
    ref = np.full((10, 12), -32768, np.int16)
    test = np.full((10, 12), 32767, np.int16)
    test[0, 0] = -32768
    diff = ref.astype(np.int64) - test.astype(np.int64)
    expected_mse = float((diff * diff).mean())
    assert max_abs_error(ref, test) == 65535
    assert mse(ref, test) == expected_mse
    quality = compare(ref, test, bits_stored=16)
    assert quality.max_abs_error == 65535
    assert quality.mse == expected_mse
    assert quality.psnr_db == pytest.approx(10 * math.log10(65535**2 / expected_mse))
    assert quality.ssim == pytest.approx(_skimage(ref, test, 16), abs=1e-5)


def test_ct_like_signed_data() -> None:
    rng = np.random.default_rng(3)
    ref = rng.integers(-1024, 3072, size=(64, 80)).astype(np.int16)
    test = (ref + rng.integers(-20, 21, size=ref.shape)).astype(np.int16)
    quality = compare(ref, test, bits_stored=12)
    diff = ref.astype(np.int64) - test
    assert quality.mse == float((diff * diff).mean())
    assert quality.max_abs_error == int(np.abs(diff).max())
    assert quality.ssim == pytest.approx(_skimage(ref, test, 12), abs=1e-5)


def test_shape_and_layout_errors() -> None:
    a = _random((10, 10), 12)
    with pytest.raises(ValueError, match=r"differ in shape: \(10, 10\) vs \(10, 11\)"):
        compare(a, _random((10, 11), 12), bits_stored=12)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, _random((10, 11), 12), 12)
    with pytest.raises(ValueError, match=r"\(rows, cols, 3\)"):
        compare(
            _random((10, 10, 4), 8), _random((10, 10, 4), 8), bits_stored=8, samples_per_pixel=3
        )
    with pytest.raises(ValueError, match="bits_stored"):
        psnr(a, a, 0)
    with pytest.raises(TypeError, match="integer dtype"):
        mse(a.astype(np.float32), a.astype(np.float32))


@pytest.mark.parametrize("shape", [(6, 6), (6, 50), (50, 6), (3, 100)])
def test_ssim_needs_7x7(shape: tuple[int, int]) -> None:
    a = _random(shape, 12)
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim(a, a, 12)
    with pytest.raises(ValueError):  # skimage refuses these too
        _skimage(a, a, 12)


# --------------------------------------------------------------------------- SSIM vs skimage


@pytest.mark.parametrize("shape", [(7, 7), (7, 40), (33, 9), (64, 64), (100, 257), (301, 123)])
def test_ssim_matches_skimage_random(shape: tuple[int, int]) -> None:
    ref = _random(shape, 12)
    test = _noisy(ref, 12, sigma=40)
    assert ssim(ref, test, 12) == pytest.approx(_skimage(ref, test, 12), abs=1e-5)


@pytest.mark.parametrize("shape", [(16, 16), (90, 131), (257, 64)])
@pytest.mark.parametrize("sigma", [1.0, 8.0, 200.0])
def test_ssim_matches_skimage_structured(shape: tuple[int, int], sigma: float) -> None:
    ref = _structured(*shape, bits=12)
    test = _noisy(ref, 12, sigma=sigma)
    assert ssim(ref, test, 12) == pytest.approx(_skimage(ref, test, 12), abs=1e-5)


def test_ssim_uncorrelated_images() -> None:
    ref = _random((50, 60), 12, seed=5)
    test = 4095 - ref
    value = ssim(ref, test, 12)
    assert value < 0
    assert value == pytest.approx(_skimage(ref, test, 12), abs=1e-5)


@pytest.mark.parametrize(
    ("bits", "dtype"), [(8, np.uint8), (10, np.uint16), (16, np.uint16), (15, np.int16)]
)
def test_ssim_bit_depths(bits: int, dtype: Any) -> None:
    ref = _random((70, 90), bits - 1 if dtype == np.int16 else bits, dtype=dtype)
    test = _noisy(ref, bits, sigma=2 ** (bits - 6))
    assert ssim(ref, test, bits) == pytest.approx(_skimage(ref, test, bits), abs=1e-5)


def test_ssim_wide_values_use_float_path() -> None:
    ref = _random((40, 40), 26, dtype=np.int32)
    test = _noisy(ref, 26, sigma=2**18)
    assert metrics._accumulator_dtype(ref, test) == np.float64
    assert ssim(ref, test, 26) == pytest.approx(_skimage(ref, test, 26), abs=1e-5)


def test_ssim_multiframe_is_mean_of_frames() -> None:
    ref = np.stack([_random((20, 30), 12, seed=s) for s in range(3)])
    test = _noisy(ref, 12, sigma=100)
    expected = np.mean([_skimage(r, t, 12) for r, t in zip(ref, test, strict=True)])
    assert ssim(ref, test, 12) == pytest.approx(expected, abs=1e-5)
    quality = compare(ref, test, bits_stored=12)
    assert quality.ssim == pytest.approx(expected, abs=1e-5)
    assert quality.mse == pytest.approx(mse(ref, test))


def test_ssim_rgb_matches_channel_axis() -> None:
    ref = _random((20, 30, 3), 8, dtype=np.uint8)
    test = _noisy(ref, 8, sigma=10)
    expected = _skimage(ref, test, 8, channel_axis=-1)
    assert ssim(ref, test, 8, samples_per_pixel=3) == pytest.approx(expected, abs=1e-5)


def test_ssim_multiframe_rgb() -> None:
    ref = _random((2, 16, 17, 3), 8, dtype=np.uint8)
    test = _noisy(ref, 8, sigma=10)
    expected = np.mean([_skimage(r, t, 8, channel_axis=-1) for r, t in zip(ref, test, strict=True)])
    assert ssim(ref, test, 8, samples_per_pixel=3) == pytest.approx(expected, abs=1e-5)


def test_non_contiguous_input() -> None:
    base = _random((80, 100), 12)
    ref = base[::2, 1::3]
    test = _noisy(base, 12, sigma=30)[::2, 1::3]
    assert ssim(ref, test, 12) == pytest.approx(_skimage(ref, test, 12), abs=1e-5)
    diff = ref.astype(np.int64) - test
    assert mse(ref, test) == float((diff * diff).mean())


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_strips_and_threads_give_same_result(monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    ref = _structured(200, 64, bits=12)
    test = _noisy(ref, 12, sigma=20)
    expected = compare(ref, test, bits_stored=12)
    monkeypatch.setattr(metrics, "_workers", lambda: workers)
    monkeypatch.setattr(metrics, "_STRIP_BYTES", 4 * 64 * 4 * 15)  # 9-row strips
    monkeypatch.setattr(metrics, "_MIN_TASK_ROWS", 10)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 64 * 7)
    got = compare(ref, test, bits_stored=12)
    assert got.ssim == pytest.approx(expected.ssim, abs=1e-12)
    assert got.ssim == pytest.approx(_skimage(ref, test, 12), abs=1e-5)
    assert got.mse == expected.mse
    assert got.max_abs_error == expected.max_abs_error
    assert mse(ref, test) == expected.mse
    assert max_abs_error(ref, test) == expected.max_abs_error


# --------------------------------------------------------------------------- properties

small_images = st.tuples(st.integers(7, 24), st.integers(7, 24), st.integers(0, 2**32 - 1)).map(
    lambda t: _random((t[0], t[1]), 12, seed=t[2])
)


@settings(max_examples=40, deadline=None)
@given(ref=small_images, k1=st.integers(1, 500), k2=st.integers(1, 500))
def test_psnr_decreases_with_error_magnitude(ref: Array, k1: int, k2: int) -> None:
    signs = np.where(np.random.default_rng(k1 + k2).random(ref.shape) < 0.5, -1, 1)
    base = ref.astype(np.int32)
    p1 = psnr(base, base + k1 * signs, 12)
    p2 = psnr(base, base + k2 * signs, 12)
    if k1 < k2:
        assert p1 > p2
    elif k1 > k2:
        assert p1 < p2
    else:
        assert p1 == p2


@settings(max_examples=40, deadline=None)
@given(ref=small_images, seed=st.integers(0, 2**32 - 1), sigma=st.floats(0.5, 2000))
def test_metrics_symmetric_and_ssim_bounded(ref: Array, seed: int, sigma: float) -> None:
    test = _noisy(ref, 12, sigma=sigma, seed=seed)
    forward = compare(ref, test, bits_stored=12)
    backward = compare(test, ref, bits_stored=12)
    assert forward.mse == backward.mse
    assert forward.max_abs_error == backward.max_abs_error
    assert forward.psnr_db == backward.psnr_db
    assert forward.ssim == pytest.approx(backward.ssim, abs=1e-12)
    assert -1.0 <= forward.ssim <= 1.0
    assert forward.ssim == pytest.approx(_skimage(ref, test, 12), abs=1e-5)


@given(
    uncompressed=st.integers(1, 10**12),
    compressed=st.integers(1, 10**12),
)
def test_cr_times_compressed_is_uncompressed(uncompressed: int, compressed: int) -> None:
    assert achieved_cr(uncompressed, compressed) * compressed == pytest.approx(
        uncompressed, rel=1e-12
    )


@given(
    rows=st.integers(1, 5000),
    cols=st.integers(1, 5000),
    spp=st.sampled_from([1, 3, 4]),
    frames=st.integers(1, 500),
    bits_allocated=st.sampled_from([1, 8, 16, 32]),
)
def test_uncompressed_size_formula(
    rows: int, cols: int, spp: int, frames: int, bits_allocated: int
) -> None:
    size = uncompressed_size(rows, cols, spp, frames, bits_allocated)
    assert size == math.ceil(rows * cols * spp * frames * bits_allocated / 8)
    if bits_allocated % 8 == 0:
        assert size == rows * cols * spp * frames * (bits_allocated // 8)
