"""The VOI transforms of PS3.3 C.11: stored values to display values in 0..1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut

FUNCTIONS = {"linear": "linear", "linear-exact": "linear-exact", "linear_exact": "linear-exact",
             "sigmoid": "sigmoid"}  # fmt: skip


@dataclass(frozen=True)
class Window:
    """A VOI window; ``function`` is linear, linear-exact or sigmoid (PS3.3 C.11.2.1.2)."""

    center: float
    width: float
    function: str = "linear"


def grey_to_unit(
    ds: Dataset, stored: npt.NDArray[Any], window: Window | None
) -> npt.NDArray[np.float64]:
    """Modality LUT, then the VOI transform, to values in 0..1 (PS3.3 C.11).

    Without ``window``: the first VOI LUT, else the first stored window, else min to max.
    """
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if window is not None:
        return apply_window(values, window)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        return _voi_lut(values, ds.VOILUTSequence[0])
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = FUNCTIONS.get(str(ds.get("VOILUTFunction", "LINEAR")).strip().lower())
        if function != "linear" or width >= 1:
            return apply_window(values, Window(center, width, function or "linear"))
    return _min_max(values)


LUT_MIN_PIXELS = 1 << 16  # below this many pixels the direct transform is as quick


def grey_to_bytes(
    ds: Dataset, stored: npt.NDArray[Any], window: Window | None, *, invert: bool = False
) -> npt.NDArray[np.uint8]:
    """:func:`grey_to_unit` as 8-bit display values (``invert``: MONOCHROME1), the same bytes.

    A large 8- or 16-bit image goes through a lookup table made by ``grey_to_unit`` itself from
    the values the image holds, so the result is identical (min-to-max included) but a 13.6 MP
    mammogram costs one table lookup per pixel instead of the float transforms per pixel.
    """
    if stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2 and stored.size >= LUT_MIN_PIXELS:
        low = int(stored.min())
        index = np.subtract(stored, low, dtype=np.int32)
        counts = np.bincount(index.ravel())
        present = np.flatnonzero(counts)
        values = (present + low).astype(stored.dtype)
        table = np.zeros(counts.size, dtype=np.float64)
        table[present] = grey_to_unit(ds, values, window)
        looked_up: npt.NDArray[np.uint8] = _to_bytes(table, invert)[index]
        return looked_up
    return _to_bytes(grey_to_unit(ds, stored, window), invert)


def _to_bytes(unit: npt.NDArray[np.float64], invert: bool) -> npt.NDArray[np.uint8]:
    if invert:
        unit = 1.0 - unit
    return np.round(unit * 255).astype(np.uint8)


def colour_to_unit(
    ds: Dataset, array: npt.NDArray[Any], window: Window | None
) -> npt.NDArray[np.float64]:
    """Colour samples to 0..1: through ``window`` when given, else by Bits Stored."""
    values = np.asarray(array, dtype=np.float64)
    if window is not None:
        return apply_window(values, window)
    return np.clip(values / float((1 << int(ds.BitsStored)) - 1), 0, 1)


def apply_window(values: npt.NDArray[Any], window: Window) -> npt.NDArray[np.float64]:
    """The VOI window functions of PS3.3 C.11.2.1.2, scaled to 0..1."""
    x = np.asarray(values, dtype=np.float64)
    c, w = window.center, window.width
    if window.function == "sigmoid":
        return np.asarray(1.0 / (1.0 + np.exp(-4.0 * (x - c) / w)), dtype=np.float64)
    if window.function == "linear-exact":
        y = (x - c) / w + 0.5
    else:
        y = (x - (c - 0.5)) / (w - 1) + 0.5 if w > 1 else (x > c - 0.5).astype(np.float64)
    return np.asarray(np.clip(y, 0.0, 1.0), dtype=np.float64)


def _voi_lut(values: npt.NDArray[np.float64], item: Dataset) -> npt.NDArray[np.float64]:
    """The first VOI LUT (PS3.3 C.11.2.1.1), its output range scaled to 0..1.

    pydicom's apply_voi wraps inputs above 255 through an 8-bit LUT, hence this version.
    """
    entries, first, _bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit entries, little endian as crgate stores them
        lut = np.frombuffer(data, "<u2").astype(np.float64)
    else:
        lut = np.asarray(data, dtype=np.float64).ravel()  # US: a list, or one value
    entries = min(entries or 65536, lut.size)
    index = np.clip(np.floor(values) - first, 0, entries - 1).astype(np.int64)
    out = lut[index]
    lo, hi = float(lut[:entries].min()), float(lut[:entries].max())
    return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return float(value)
    items = list(value)
    return float(items[0]) if items else None


def _min_max(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)
