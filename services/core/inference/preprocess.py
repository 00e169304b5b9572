"""The seed study's preprocessing, in one place for training and the service.

Per breast: each view is scaled to a fixed grid (the study's 30 % of the training geometry),
cropped (left-breast views lose the right half, right-breast views the left half; MLO views lose
the top fifth, CC views the bottom fifth), right-breast views are mirrored so the chest wall is
on the left as in left-breast views, and the CC and MLO crops are put side by side: one
[1, H, W] float32 input per breast. MONOCHROME1 is inverted; intensities are divided by
2**BitsStored - 1. Every parameter lives in :class:`Preprocessing`, which the model card records.
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

    @classmethod
    def for_training_geometry(cls, width: int, height: int, fraction: float = 0.3) -> Preprocessing:
        return cls(
            view_rows=round(height * fraction),
            view_cols=round(width * fraction),
            resize_fraction=fraction,
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
    def input_shape(self) -> tuple[int, int]:
        """(H, W) of one breast's input: CC and MLO crops side by side."""
        return self.crop_rows, 2 * self.crop_cols

    def crop_box(self, view: str, laterality: str) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the kept region in the scaled view grid."""
        _check_view(view, laterality)
        top = 0 if view == "CC" else self.view_rows - self.crop_rows
        left = 0 if laterality == "L" else self.view_cols - self.crop_cols
        return top, top + self.crop_rows, left, left + self.crop_cols


def _check_view(view: str, laterality: str) -> None:
    if view not in VIEW_KINDS:
        raise InvalidInput(f"view {view!r} is not CC or MLO")
    if laterality not in LATERALITIES:
        raise InvalidInput(f"laterality {laterality!r} is not L or R")


def normalise(pixels: npt.NDArray[Any], bits_stored: int, photometric: str = "MONOCHROME2") -> F32:
    """Stored values to [0, 1]; MONOCHROME1 inverted so that dense tissue is bright."""
    peak = float((1 << bits_stored) - 1)
    out = pixels.astype(np.float32) / np.float32(peak)
    if photometric == "MONOCHROME1":
        out = np.float32(1.0) - out
    clipped: F32 = np.clip(out, 0.0, 1.0)
    return clipped


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
    """One view: normalise, scale to the view grid, crop, mirror right-breast views."""
    if pixels.ndim != 2:
        raise InvalidInput(f"a {view} view must be one greyscale frame, got shape {pixels.shape}")
    top, bottom, left, right = params.crop_box(view, laterality)
    scaled = resize(normalise(pixels, bits_stored, photometric), params.view_rows, params.view_cols)
    crop = scaled[top:bottom, left:right]
    if laterality == "R" and params.mirror_right:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def breast_input(
    cc: npt.NDArray[np.floating[Any]], mlo: npt.NDArray[np.floating[Any]]
) -> npt.NDArray[np.floating[Any]]:
    """[1, H, W]: the prepared CC and MLO views side by side."""
    return np.concatenate([cc, mlo], axis=1)[np.newaxis]


def map_back(
    saliency: F32, view: str, laterality: str, params: Preprocessing, rows: int, cols: int
) -> F32:
    """A saliency map over one breast's input, back onto one view's original pixel grid.

    ``saliency`` may be coarser than the input (Grad-CAM); it is first scaled to the input size,
    the view's half is taken, the mirroring undone, and it is placed in the crop box of the view
    grid (zero where the crop removed the image) and scaled to ``rows`` x ``cols``.
    """
    height, width = params.input_shape
    full = resize(saliency.astype(np.float32), height, width)
    half = full[:, : params.crop_cols] if view == "CC" else full[:, params.crop_cols :]
    if laterality == "R" and params.mirror_right:
        half = half[:, ::-1]
    grid = np.zeros((params.view_rows, params.view_cols), dtype=np.float32)
    top, bottom, left, right = params.crop_box(view, laterality)
    grid[top:bottom, left:right] = half
    return resize(grid, rows, cols)
