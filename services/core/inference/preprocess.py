"""The seed study's preprocessing, in one place for training and the service.

Per breast: each view is scaled to a fixed grid (the study's 30 % of the training geometry),
cropped (left-breast views lose the right half, right-breast views the left half; MLO views lose
the top fifth, CC views the bottom fifth), right-breast views are mirrored so the chest wall is
on the left as in left-breast views, and the CC and MLO crops are put side by side: one
[1, H, W] float32 input per breast. MONOCHROME1 is inverted; intensities are divided by
2**BitsStored - 1. Every parameter lives in :class:`Preprocessing`, which the model card records.

``views`` says what one model input holds: ``cc+mlo`` (the seed study's, default) both crops
side by side, or ``single`` one crop (the runtime then runs each view on its own and averages the
two probabilities, :mod:`services.core.inference.runtime`); the breast input is the same layout
either way.

Two parameters of ours (both off in cards that do not name them): ``align`` pads each crop with
zeros (at its bottom and on the side away from the chest wall) to a multiple of that many pixels,
so that the cells of a Grad-CAM map (32 input pixels for both architectures) tile each view
exactly; ``view_gap`` puts that many zero columns between the CC and MLO crops, so that no cell
of the last convolution block straddles the two views.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from services.core.errors import InvalidInput, InvalidParameter

F32 = npt.NDArray[np.float32]
VIEW_KINDS = ("CC", "MLO")
VIEW_MODES = ("cc+mlo", "single")
LATERALITIES = ("L", "R")


@dataclass(frozen=True)
class Preprocessing:
    """Geometry of the model input; ``view_rows`` x ``view_cols`` is the scaled view grid."""

    view_rows: int
    view_cols: int
    resize_fraction: float = 0.3  # view grid = this fraction of the training geometry
    crop_fraction_cc_bottom: float = 0.2
    crop_fraction_mlo_top: float = 0.2
    keep_width_fraction: float = 0.5
    mirror_right: bool = True
    resample: str = "bilinear-antialiased"
    align: int = 1  # each crop zero-padded (bottom, side away from the chest wall) to a multiple
    view_gap: int = 0  # zero columns between the CC and the MLO crop
    views: str = "cc+mlo"  # what one model input holds: both crops, or one (single)

    def __post_init__(self) -> None:
        if self.views not in VIEW_MODES:
            raise InvalidParameter(
                f"preprocessing views must be {' or '.join(VIEW_MODES)}, got {self.views!r}"
            )
        for name in ("view_rows", "view_cols", "align"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameter(
                    f"preprocessing {name} must be a positive integer, got {value!r}"
                )
        if (
            isinstance(self.view_gap, bool)
            or not isinstance(self.view_gap, int)
            or self.view_gap < 0
        ):
            raise InvalidParameter(
                f"preprocessing view_gap must be a non-negative integer, got {self.view_gap!r}"
            )

    @classmethod
    def for_training_geometry(
        cls, width: int, height: int, fraction: float = 0.3, *, align: int = 1, view_gap: int = 0
    ) -> Preprocessing:
        return cls(
            view_rows=round(height * fraction),
            view_cols=round(width * fraction),
            resize_fraction=fraction,
            align=align,
            view_gap=view_gap,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as exc:
            raise InvalidParameter(f"model card preprocessing is incomplete: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def crop_rows(self) -> int:
        return self.view_rows - round(self.view_rows * self.crop_fraction_cc_bottom)

    @property
    def crop_cols(self) -> int:
        return round(self.view_cols * self.keep_width_fraction)

    @property
    def pad_rows(self) -> int:
        """Rows of each view in the input: the crop padded to a multiple of ``align``."""
        return -(-self.crop_rows // self.align) * self.align

    @property
    def pad_cols(self) -> int:
        """Columns of each view in the input: the crop padded to a multiple of ``align``."""
        return -(-self.crop_cols // self.align) * self.align

    @property
    def input_shape(self) -> tuple[int, int]:
        """(H, W) of one breast's input: CC and MLO (padded) crops side by side, the gap between."""
        return self.pad_rows, 2 * self.pad_cols + self.view_gap

    @property
    def model_input_shape(self) -> tuple[int, int]:
        """(H, W) the graph takes: the breast input, or one view's padded crop (``single``)."""
        if self.views == "single":
            return self.pad_rows, self.pad_cols
        return self.input_shape

    def view_origin(self, view: str) -> int:
        """First input column of ``view``'s crop."""
        _check_view(view, "L")
        return 0 if view == "CC" else self.pad_cols + self.view_gap

    def crop_box(self, view: str, laterality: str) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the kept region in the scaled view grid."""
        _check_view(view, laterality)
        top = 0 if view == "CC" else self.view_rows - self.crop_rows
        left = 0 if laterality == "L" else self.view_cols - self.crop_cols
        return top, top + self.crop_rows, left, left + self.crop_cols


@dataclass(frozen=True)
class SaliencyGrid:
    """Where the cells of a coarse saliency map lie on the input: cell ``(i, j)`` is centred
    on input pixel ``(offset[0] + stride[0] * i, offset[1] + stride[1] * j)`` (receptive-field
    centres; the model card records them for Grad-CAM)."""

    stride: tuple[float, float]
    offset: tuple[float, float]

    @classmethod
    def stretched(cls, shape: tuple[int, int], onto: tuple[int, int]) -> SaliencyGrid:
        """A map spread evenly over the input (cell centres as in an image resize)."""
        sy, sx = onto[0] / shape[0], onto[1] / shape[1]
        return cls((sy, sx), (sy / 2 - 0.5, sx / 2 - 0.5))


def _check_view(view: str, laterality: str) -> None:
    if view not in VIEW_KINDS:
        raise InvalidInput(f"view {view!r} is not CC or MLO")
    if laterality not in LATERALITIES:
        raise InvalidInput(f"laterality {laterality!r} is not L or R")


def normalise(pixels: npt.NDArray[Any], bits_stored: int, photometric: str = "MONOCHROME2") -> F32:
    """Stored values to [0, 1]; MONOCHROME1 inverted so that dense tissue is bright."""
    peak = float((1 << bits_stored) - 1)
    out: F32 = pixels.astype(np.float32)  # a new array: the steps below work in place
    np.divide(out, np.float32(peak), out=out)
    if photometric == "MONOCHROME1":
        np.subtract(np.float32(1.0), out, out=out)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def resize(image: F32, rows: int, cols: int) -> F32:
    """Antialiased bilinear resize (Pillow, 32-bit float): deterministic on every platform."""
    if image.shape == (rows, cols):
        return image.astype(np.float32, copy=False)
    resized = Image.fromarray(image.astype(np.float32), mode="F").resize(
        (cols, rows), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def prepare_view(
    pixels: npt.NDArray[Any],
    view: str,
    laterality: str,
    params: Preprocessing,
    *,
    bits_stored: int,
    photometric: str = "MONOCHROME2",
) -> F32:
    """One view: normalise, scale to the view grid, crop, mirror right-breast views.

    The result is the crop (``crop_rows`` x ``crop_cols``); :func:`breast_input` pads it.
    """
    if pixels.ndim != 2:
        raise InvalidInput(f"a {view} view must be one greyscale frame, got shape {pixels.shape}")
    top, bottom, left, right = params.crop_box(view, laterality)
    scaled = resize(normalise(pixels, bits_stored, photometric), params.view_rows, params.view_cols)
    crop = scaled[top:bottom, left:right]
    if laterality == "R" and params.mirror_right:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def breast_input(
    cc: npt.NDArray[np.floating[Any]],
    mlo: npt.NDArray[np.floating[Any]],
    params: Preprocessing,
) -> npt.NDArray[np.floating[Any]]:
    """[1, H, W]: the prepared CC and MLO crops side by side (padded, with the gap between)."""
    expected = (params.crop_rows, params.crop_cols)
    for view, crop in (("CC", cc), ("MLO", mlo)):
        if crop.shape != expected:
            raise InvalidInput(f"prepared {view} crop is {crop.shape}, expected {expected}")
    height, width = params.input_shape
    out = np.zeros((1, height, width), dtype=np.result_type(cc.dtype, mlo.dtype))
    for view, crop in (("CC", cc), ("MLO", mlo)):
        left = params.view_origin(view)
        out[0, : params.crop_rows, left : left + params.crop_cols] = crop
    return out


def _interpolation(n_out: int, n_in: int, stride: float, offset: float) -> F32:
    """[n_out, n_in] weights of linear interpolation from cells centred at ``offset + stride*i``
    (constant beyond the first and last centre)."""
    u = np.clip((np.arange(n_out, dtype=np.float64) - offset) / stride, 0.0, n_in - 1)
    i0 = np.floor(u).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = u - i0
    out = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(out, (rows, i0), 1.0 - w)
    np.add.at(out, (rows, i1), w)
    return out.astype(np.float32)


def to_input_grid(saliency: F32, params: Preprocessing, grid: SaliencyGrid | None = None) -> F32:
    """A saliency map ``[h, w]`` over one breast's input, interpolated to the input ``[H, W]``.

    ``grid`` says where the map's cells lie on the input; without it the map is spread evenly
    over the input (right for occlusion maps, which already have the input's size).
    """
    height, width = params.input_shape
    h, w = saliency.shape
    if grid is None:
        grid = SaliencyGrid.stretched((h, w), (height, width))
    wy = _interpolation(height, h, grid.stride[0], grid.offset[0])
    wx = _interpolation(width, w, grid.stride[1], grid.offset[1])
    full: F32 = (wy @ saliency.astype(np.float32) @ wx.T).astype(np.float32)
    return full


def map_back(
    saliency: F32,
    view: str,
    laterality: str,
    params: Preprocessing,
    rows: int,
    cols: int,
    grid: SaliencyGrid | None = None,
) -> F32:
    """A saliency map over one breast's input, back onto one view's original pixel grid.

    ``saliency`` may be coarser than the input (Grad-CAM); it is first interpolated to the input
    (:func:`to_input_grid`), the view's crop is taken (padding and gap dropped), the mirroring
    undone, and it is placed in the crop box of the view grid (zero where the crop removed the
    image) and scaled to ``rows`` x ``cols``.
    """
    full = to_input_grid(saliency, params, grid)
    left = params.view_origin(view)
    half = full[: params.crop_rows, left : left + params.crop_cols]
    if laterality == "R" and params.mirror_right:
        half = half[:, ::-1]
    grid_map = np.zeros((params.view_rows, params.view_cols), dtype=np.float32)
    top, bottom, left_box, right_box = params.crop_box(view, laterality)
    grid_map[top:bottom, left_box:right_box] = half
    return resize(grid_map, rows, cols)
