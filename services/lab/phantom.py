"""Synthetic screening-mammography phantoms with ground-truth lesions.

A phantom study is four "Digital Mammography X-Ray Image - For Presentation"
instances (LCC, LMLO, RCC, RMLO) in explicit VR little endian, MONOCHROME2,
16 bits allocated and (by default) 12 stored, 3328 x 4096 at 0.07 mm.

Everything is deterministic: study ``i`` of seed ``s`` depends only on
``(s, i)``, the configuration and the label fractions, so the same arguments
give byte-identical pixels and identical UIDs.

Image model (normalised to 1.0 = largest stored value, then quantised):

* air background near 0, the breast brighter (more attenuation, LOG data);
* a half-ellipse breast attached to the chest wall: the left edge of the image
  for L views, the right edge for R views; MLO views extend to the top edge
  (axillary tail) and carry a pectoral-muscle triangle in the top corner at
  the chest-wall side;
* a thickness roll-off towards the skin and a thin bright skin line;
* fibroglandular texture from band-limited 1/f^beta noise, denser centrally;
* Poisson-like quantum noise (standard deviation grows with the signal).

Ground truth is per breast: ``malignant`` (spiculated mass or
microcalcification cluster, 50/50), ``benign`` (round smooth mass) or
``normal``. A lesion has one 3-D position per breast, (depth from the chest
wall, medio-lateral offset, supero-inferior offset), projected into the CC
view as (depth, medio-lateral) and into the MLO view as (depth,
supero-inferior), so it appears at a consistent place in both views.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import scipy.fft
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian
from scipy.special import ndtri

from services.core.dicom.io import atomic_output, write_dataset
from services.core.dicom.uids import stable_uid, validate_uid
from services.core.errors import InvalidParameter, OutputError

F32 = npt.NDArray[np.float32]

VIEWS: Final = ("LCC", "LMLO", "RCC", "RMLO")
LABELS: Final = ("normal", "benign", "malignant")
LESION_KINDS: Final = ("none", "round_mass", "spiculated_mass", "calcification_cluster")

MG_FOR_PRESENTATION: Final = "1.2.840.10008.5.1.4.1.1.1.2"

DEFAULT_WIDTH: Final = 3328
DEFAULT_HEIGHT: Final = 4096
DEFAULT_SPACING_MM: Final = 0.07
MIN_SIDE: Final = 64
MAX_SIDE: Final = 8192
MAX_ASPECT: Final = 4.0
# Largest lesion extent (radius, pixels) as a fraction of the shorter image side: 0.12 lets a
# spiculated mass reach 22 mm radius (44 mm across with its spicules) in the default 233 mm wide
# field, the size of large palpable cancers; the classifier's Grad-CAM geometry test needs masses
# that large (docs/classifier.md).
_MAX_LESION_FRACTION: Final = 0.12

_UID_NAMESPACE: Final = "crgate-phantom-v1"

# Normalised intensity levels (1.0 = 2**bits_stored - 1).
_AIR = 0.006
_FAT = 0.36
_PECTORAL = 0.66
_SKIN = 0.06
_TEXTURE_CUTOFF_CYC_PER_MM = 2.0
_TEXTURE_LOW_CYC_PER_MM = 1.0 / 60.0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidParameter(message)


def _check_range(name: str, value: tuple[float, float], lo: float, hi: float) -> None:
    _check(
        isinstance(value, tuple) and len(value) == 2,
        f"{name} must be a (min, max) pair, got {value!r}",
    )
    a, b = float(value[0]), float(value[1])
    _check(
        math.isfinite(a) and math.isfinite(b) and lo <= a <= b <= hi,
        f"{name} must satisfy {lo} <= min <= max <= {hi}, got {value!r}",
    )


def _check_unit(name: str, value: float, lo: float = 0.0, hi: float = 1.0) -> None:
    _check(
        isinstance(value, int | float) and math.isfinite(value) and lo <= value <= hi,
        f"{name} must be a number in [{lo}, {hi}], got {value!r}",
    )


def _check_size(width: object, height: object) -> None:
    for name, value in (("width", width), ("height", height)):
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            f"{name} must be an integer number of pixels, got {value!r}",
        )
        assert isinstance(value, int)
        _check(
            MIN_SIDE <= value <= MAX_SIDE,
            f"{name} must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {value}",
        )
    assert isinstance(width, int) and isinstance(height, int)
    aspect = max(width, height) / min(width, height)
    _check(
        aspect <= MAX_ASPECT,
        f"size {width}x{height} has an aspect ratio of {aspect:.1f}; "
        f"width and height must be within a factor {MAX_ASPECT:g} of each other",
    )


@dataclass(frozen=True)
class PhantomConfig:
    """Geometry and appearance of phantom images: the ``default`` preset (:data:`PRESETS`).

    The default geometry is the seed study's (3328 x 4096 at 0.07 mm); the default lesions are
    the ones the shipped models were trained on (large, clearly visible); the ``subtle`` preset
    has the smaller, fainter lesions closer to real screening findings.

    ``pixel_spacing_mm=None`` keeps the default detector's field of view
    (232.96 x 286.72 mm, by area) whatever the size, so 3328 x 4096 gets
    0.07 mm and a 256 x 320 test image about 0.9 mm; lesion sizes are in mm.
    Contrasts and the noise level are fractions of the full stored range.
    """

    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    pixel_spacing_mm: float | None = None
    bits_stored: int = 12
    mass_radius_mm: tuple[float, float] = (7.0, 20.0)
    mass_contrast: float = 0.25
    spicule_count: tuple[int, int] = (30, 45)
    calc_count: tuple[int, int] = (12, 30)
    calc_size_mm: tuple[float, float] = (0.6, 1.2)
    calc_cluster_radius_mm: tuple[float, float] = (5.0, 10.0)
    calc_contrast: float = 0.5
    noise_level: float = 0.012
    texture_beta: float = 3.0
    texture_contrast: float = 0.25
    density: float = 0.0

    @classmethod
    def from_overrides(
        cls, overrides: dict[str, Any], *, preset: str = "default", **fixed: Any
    ) -> PhantomConfig:
        """A config from a preset, JSON-like overrides (lists become tuples) and ``fixed``
        values, later ones winning; unknown names and presets refused."""
        if preset not in PRESETS:
            raise InvalidParameter(
                f"unknown phantom preset {preset!r}: use one of {', '.join(PRESETS)}"
            )
        overrides = {**PRESETS[preset], **overrides}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidParameter(
                f"unknown phantom setting(s) {', '.join(unknown)}: use {', '.join(sorted(names))}"
            )
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        try:
            return cls(**{**values, **fixed})
        except TypeError as exc:
            raise InvalidParameter(f"bad phantom setting: {exc}") from None

    def __post_init__(self) -> None:
        _check_size(self.width, self.height)
        if self.pixel_spacing_mm is not None:
            _check_unit("pixel_spacing_mm", self.pixel_spacing_mm, 0.01, 5.0)
        _check(
            isinstance(self.bits_stored, int) and 10 <= self.bits_stored <= 16,
            f"bits_stored must be an integer from 10 to 16, got {self.bits_stored!r}",
        )
        _check_range("mass_radius_mm", self.mass_radius_mm, 0.5, 50.0)
        _check_range("calc_size_mm", self.calc_size_mm, 0.05, 3.0)
        _check_range("calc_cluster_radius_mm", self.calc_cluster_radius_mm, 0.5, 50.0)
        for name, pair, top in (
            ("spicule_count", self.spicule_count, 64),
            ("calc_count", self.calc_count, 200),
        ):
            _check(
                isinstance(pair, tuple)
                and len(pair) == 2
                and all(isinstance(v, int) for v in pair)
                and 1 <= pair[0] <= pair[1] <= top,
                f"{name} must be an integer (min, max) pair with 1 <= min <= max <= {top}, "
                f"got {pair!r}",
            )
        _check_unit("mass_contrast", self.mass_contrast)
        _check_unit("calc_contrast", self.calc_contrast)
        _check_unit("noise_level", self.noise_level, 0.0, 0.2)
        _check_unit("texture_beta", self.texture_beta, 1.0, 5.0)
        _check_unit("texture_contrast", self.texture_contrast, 0.0, 0.6)
        _check_unit("density", self.density, -2.0, 2.0)
        spacing = self.spacing_mm
        biggest = max(
            self.mass_radius_mm[1] * 1.25, self.calc_cluster_radius_mm[1] + self.calc_size_mm[1]
        )
        limit = _MAX_LESION_FRACTION * min(self.width, self.height)
        _check(
            biggest / spacing <= limit,
            f"mass_radius_mm/calc_cluster_radius_mm up to {biggest:g} mm is {biggest / spacing:.0f}"
            f" px at {spacing:.4g} mm/px, too large for a {self.width}x{self.height} image "
            f"(at most {limit:.0f} px); use smaller lesions or a coarser pixel_spacing_mm",
        )

    @property
    def spacing_mm(self) -> float:
        """The pixel spacing in mm (derived from the size when not given)."""
        if self.pixel_spacing_mm is not None:
            return float(self.pixel_spacing_mm)
        area = DEFAULT_WIDTH * DEFAULT_HEIGHT / (self.width * self.height)
        return DEFAULT_SPACING_MM * math.sqrt(area)

    @property
    def max_value(self) -> int:
        return int(2**self.bits_stored - 1)


# Named lesion settings. ``default`` (the dataclass defaults): what cnn3-phantom-v2 and
# resnet18-phantom-v1 were trained and tested on (their cards record it). ``subtle``: the
# generator's earlier defaults, small faint lesions closer to real screening findings, which
# those models do not read (docs/classifier.md has the figures).
PRESETS: Final[dict[str, dict[str, Any]]] = {
    "default": {},
    "subtle": {
        "mass_radius_mm": (3.0, 7.5),
        "mass_contrast": 0.1,
        "spicule_count": (10, 20),
        "calc_count": (6, 16),
        "calc_size_mm": (0.2, 0.5),
        "calc_cluster_radius_mm": (2.5, 6.0),
        "calc_contrast": 0.3,
    },
}

DEFAULT_CONFIG: Final = PhantomConfig()


@dataclass(frozen=True)
class TruthRow:
    """Ground truth of one view; centre and radius are in that view's pixels."""

    study_uid: str
    patient_id: str
    laterality: str
    view: str
    sop_instance_uid: str
    file: str
    label: str
    lesion_kind: str
    center_x: float | None
    center_y: float | None
    radius_px: float | None


TRUTH_FIELDS: Final = tuple(f.name for f in fields(TruthRow))


@dataclass
class PhantomStudy:
    """One generated study: the four datasets keyed by VIEWS and their truth."""

    study_uid: str
    datasets: dict[str, Dataset]
    truth: list[TruthRow] = field(default_factory=list)


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"WxH"`` (e.g. ``"512x640"``) into ``(width, height)``."""
    parts = str(text).strip().lower().split("x")
    good = len(parts) == 2 and all(p.strip().isdigit() for p in parts)
    _check(good, f"size {text!r} is not WIDTHxHEIGHT in pixels, e.g. 512x640 or 3328x4096")
    width, height = (int(p) for p in parts)
    try:
        _check_size(width, height)
    except InvalidParameter as exc:
        raise InvalidParameter(f"size {text!r}: {exc}") from None
    return width, height


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Outline:
    """Half-ellipse breast in canonical coordinates (chest wall at x = 0)."""

    depth: float  # semi-axis along x (chest wall to nipple), px
    yc: float  # row of the ellipse centre
    b_up: float  # semi-axis towards row 0, px
    b_down: float  # semi-axis towards the last row, px
    pect_w: float = 0.0  # pectoral triangle along the top edge (0: none), px
    pect_h: float = 0.0  # pectoral triangle along the chest wall, px
    pect_gamma: float = 1.0


@dataclass(frozen=True)
class _Lesion:
    kind: str
    depth: float  # fraction of the nipple distance from the chest wall
    ml: float  # medio-lateral offset, fraction of the local half-width (CC rows)
    si: float  # supero-inferior offset, fraction of the local half-height (MLO rows)
    radius_mm: float
    calcs_mm: npt.NDArray[np.float64]  # (n, 4): dx, d_ml, d_si, diameter (calcs only)


@dataclass(frozen=True)
class _Breast:
    laterality: str
    label: str
    cc: _Outline
    mlo: _Outline
    lesion: _Lesion | None


def _labels(seed: int, index: int, malignant: float, benign: float) -> dict[str, str]:
    """Lesion kind per breast ("L", "R"); independent of the image configuration."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 1]))
    draws = rng.random(4)
    out: dict[str, str] = {}
    for i, lat in enumerate("LR"):
        u = float(draws[2 * i])
        if u < malignant:
            kind = "spiculated_mass" if draws[2 * i + 1] < 0.5 else "calcification_cluster"
        elif u < malignant + benign:
            kind = "round_mass"
        else:
            kind = "none"
        out[lat] = kind
    return out


def _label_of(kind: str) -> str:
    if kind == "none":
        return "normal"
    return "benign" if kind == "round_mass" else "malignant"


def _side_b(o: _Outline, offset: float) -> float:
    return o.b_up if offset < 0 else o.b_down


def _position(o: _Outline, depth: float, offset: float) -> tuple[float, float]:
    """Canonical (x, y) of a point at relative depth/offset inside outline ``o``."""
    half = math.sqrt(max(0.0, 1.0 - depth * depth))
    return depth * o.depth, o.yc + offset * _side_b(o, offset) * half


def _in_study_crop(x: float, y: float, extent: float, w: int, h: int, *, mlo_view: bool) -> bool:
    """Inside what the seed study's preprocessing keeps: the chest-wall half of the width,
    and all but the top fifth (MLO) or the bottom fifth (CC) of the height."""
    if x + extent > 0.5 * w:
        return False
    return y - extent >= 0.2 * h if mlo_view else y + extent <= 0.8 * h


def _inside_margin(o: _Outline, x: float, y: float, extent: float, w: int, h: int) -> bool:
    dy = y - o.yc
    b = o.b_up if dy < 0 else o.b_down
    s = math.hypot(x / o.depth, dy / b)
    if s + extent / min(o.depth, b) > 0.9:
        return False
    if not (extent + 2 <= y <= h - extent - 3 and x <= w - extent - 3):
        return False
    if x < extent + 0.04 * w:
        return False
    if o.pect_w > 0:
        q = x / o.pect_w + (max(y, 0.0) / o.pect_h) ** o.pect_gamma
        margin = 1.0 + 1.5 * extent / min(o.pect_w, o.pect_h) + 0.05
        if q < margin:
            return False
    return True


def _make_breast(seed: int, index: int, lat_index: int, kind: str, cfg: PhantomConfig) -> _Breast:
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 2, lat_index]))
    w, h = cfg.width, cfg.height
    u = rng.uniform

    # The seed study crops away the half of each view opposite the chest wall, because its
    # breasts lie within that half of the detector: so do these.
    depth_cc = w * u(0.40, 0.48)
    b_cc = h * u(0.32, 0.42)
    cc = _Outline(
        depth=depth_cc,
        yc=h * (0.5 + u(-0.03, 0.03)),
        b_up=b_cc * u(0.92, 1.08),
        b_down=b_cc * u(0.92, 1.08),
    )
    yc_m = h * u(0.44, 0.54)
    mlo = _Outline(
        depth=min(depth_cc * u(1.0, 1.1), 0.5 * w),
        yc=yc_m,
        b_up=yc_m * u(1.05, 1.3),
        b_down=h * u(0.36, 0.44),
        pect_w=w * u(0.22, 0.36),
        pect_h=h * u(0.4, 0.58),
        pect_gamma=u(1.1, 1.6),
    )

    lesion: _Lesion | None = None
    if kind != "none":
        spacing = cfg.spacing_mm
        calcs = np.zeros((0, 4))
        if kind == "calcification_cluster":
            radius_mm = u(*cfg.calc_cluster_radius_mm)
            n = int(rng.integers(cfg.calc_count[0], cfg.calc_count[1] + 1))
            # Uniform in a ball: direction * radius * cbrt(u).
            vec = rng.standard_normal((n, 3))
            vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-9)
            vec *= radius_mm * np.cbrt(rng.random((n, 1)))
            sizes = rng.uniform(*cfg.calc_size_mm, size=(n, 1))
            calcs = np.hstack([vec, sizes])
            extent = (radius_mm + cfg.calc_size_mm[1]) / spacing
        else:
            radius_mm = u(*cfg.mass_radius_mm)
            extent = radius_mm * (1.25 if kind == "spiculated_mass" else 1.05) / spacing
        extent += 1.0
        # Rejection sampling of a 3-D position visible inside both views.
        depth, ml, si = 0.45, 0.0, 0.2
        for _ in range(500):
            cand = (u(0.2, 0.75), u(-0.6, 0.6), u(-0.6, 0.6))
            xc, yc = _position(cc, cand[0], cand[1])
            xm, ym = _position(mlo, cand[0], cand[2])
            if (
                _inside_margin(cc, xc, yc, extent, w, h)
                and _inside_margin(mlo, xm, ym, extent, w, h)
                and _in_study_crop(xc, yc, extent, w, h, mlo_view=False)
                and _in_study_crop(xm, ym, extent, w, h, mlo_view=True)
            ):
                depth, ml, si = cand
                break
        lesion = _Lesion(kind, depth, ml, si, radius_mm, calcs)
    return _Breast("LR"[lat_index], _label_of(kind), cc, mlo, lesion)


# --------------------------------------------------------------------------- rendering


def _texture(rng: np.random.Generator, cfg: PhantomConfig) -> F32:
    """Band-limited 1/f^beta noise field, zero mean and unit standard deviation."""
    h, w = cfg.height, cfg.width
    spacing = cfg.spacing_mm
    nyquist = 0.5 / spacing
    cut = min(_TEXTURE_CUTOFF_CYC_PER_MM, nyquist)
    ky = min(h // 2, int(cut * h * spacing) + 1)
    kx = min(w // 2, int(cut * w * spacing) + 1)
    spec = np.zeros((h, w // 2 + 1), dtype=np.complex64)
    rows = np.r_[0 : ky + 1, h - ky : h] if ky < h // 2 else np.arange(h)
    rows = np.unique(rows)
    fy = np.fft.fftfreq(h, d=spacing)[rows].astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w, d=spacing)[: kx + 1].astype(np.float32)[None, :]
    f2 = fy * fy + fx * fx + np.float32(_TEXTURE_LOW_CYC_PER_MM**2)
    amp = f2 ** np.float32(-cfg.texture_beta / 4.0)
    amp[f2 > np.float32(cut * cut + _TEXTURE_LOW_CYC_PER_MM**2)] = 0.0
    shape = (rows.size, kx + 1)
    noise = rng.standard_normal(shape, dtype=np.float32) + 1j * rng.standard_normal(
        shape, dtype=np.float32
    )
    spec[rows, : kx + 1] = amp * noise
    spec[0, 0] = 0.0
    out = np.asarray(scipy.fft.irfft2(spec, s=(h, w), workers=-1), dtype=np.float32)
    std = float(out[::4, ::4].std())
    out *= np.float32(1.0 / max(std, 1e-12))
    return out


def _gaussian_table() -> F32:
    p = (np.arange(65536, dtype=np.float64) + 0.5) / 65536.0
    table: F32 = np.asarray(ndtri(p), dtype=np.float32)
    table /= np.float32(table.std())
    return table


_GAUSS: Final = _gaussian_table()


def _normal(rng: np.random.Generator, shape: tuple[int, int]) -> F32:
    """Fast standard normal samples (inverse-CDF table of 65536 quantiles)."""
    idx = rng.integers(0, 65536, size=shape, dtype=np.uint16)
    return np.asarray(_GAUSS[idx], dtype=np.float32)


@dataclass(frozen=True)
class _ViewTruth:
    x: float | None
    y: float | None
    radius_px: float | None


def _bbox(x: float, y: float, r: float, w: int, h: int) -> tuple[slice, slice, F32, F32] | None:
    x0, x1 = max(0, int(x - r) - 1), min(w, int(x + r) + 2)
    y0, y1 = max(0, int(y - r) - 1), min(h, int(y + r) + 2)
    if x0 >= x1 or y0 >= y1:
        return None
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(x)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(y)
    return slice(y0, y1), slice(x0, x1), dx, dy


def _f32(a: npt.ArrayLike) -> F32:
    """``a`` as float32 (a no-op for the float32 arrays used here; pins the type)."""
    return np.asarray(a, dtype=np.float32)


def _blend_mass(img: F32, sy: slice, sx: slice, core: F32, extra: F32, floor: float) -> None:
    """A mass is at least as dense as glandular tissue (``floor``) inside its core,
    plus ``extra`` on top."""
    patch = img[sy, sx]
    patch += core * np.maximum(np.float32(floor) - patch, np.float32(0.0))
    patch += extra


def _add_round_mass(
    img: F32,
    x: float,
    y: float,
    r: float,
    contrast: float,
    floor: float,
    rng: np.random.Generator,
) -> None:
    h, w = img.shape
    box = _bbox(x, y, r * 1.1, w, h)
    if box is None:
        return
    sy, sx, dx, dy = box
    ratio = rng.uniform(0.85, 1.0)
    ang = rng.uniform(0.0, math.pi)
    c, s = np.float32(math.cos(ang)), np.float32(math.sin(ang))
    u = (dx * c + dy * s) / np.float32(r)
    v = (dy * c - dx * s) / np.float32(r * ratio)
    # Projected thickness of an ellipsoid: sqrt(1 - r^2).
    t = _f32(np.sqrt(np.clip(1.0 - (u * u + v * v), 0.0, 1.0)))
    _blend_mass(img, sy, sx, np.float32(0.8) * np.sqrt(t), np.float32(contrast) * t, floor)


def _add_spiculated_mass(
    img: F32,
    x: float,
    y: float,
    r: float,
    contrast: float,
    floor: float,
    n_spic: int,
    rng: np.random.Generator,
) -> None:
    h, w = img.shape
    reach = r * 3.0
    box = _bbox(x, y, reach, w, h)
    if box is None:
        return
    sy, sx, dx, dy = box
    rad = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    wobble = np.ones_like(rad)
    for k in range(2, 7):
        amp = np.float32(rng.uniform(0.01, 0.04))
        wobble += amp * np.cos(np.float32(k) * theta + np.float32(rng.uniform(0, 2 * math.pi)))
    rel = rad / (np.float32(r) * wobble)
    core = _f32(np.sqrt(np.clip(1.0 - rel * rel, 0.0, 1.0)))
    spic = np.zeros_like(rad)
    width = max(0.7, 0.07 * r)
    for _ in range(n_spic):
        phi = rng.uniform(0.0, 2.0 * math.pi)
        length = r * rng.uniform(1.6, 3.0)
        c, s = np.float32(math.cos(phi)), np.float32(math.sin(phi))
        along = dx * c + dy * s
        perp = dy * c - dx * s
        wid = np.float32(width * rng.uniform(0.7, 1.3))
        taper = np.clip(1.0 - along / np.float32(length), 0.0, 1.0)
        taper[along < 0] = 0.0
        spic = np.maximum(spic, taper * np.exp(-((perp / wid) ** 2)))
    total = np.maximum(core, np.float32(0.6) * spic)
    lift = np.float32(0.8) * np.maximum(np.sqrt(core), np.float32(0.6) * spic)
    _blend_mass(img, sy, sx, lift, np.float32(contrast) * total, floor)


def _add_calcs(
    img: F32,
    x: float,
    y: float,
    offsets_px: npt.NDArray[np.float64],
    diam_px: npt.NDArray[np.float64],
    contrast: float,
    rng: np.random.Generator,
) -> None:
    h, w = img.shape
    for (ox, oy), d in zip(offsets_px, diam_px, strict=True):
        sigma = max(0.6, float(d) / 2.355)
        box = _bbox(x + float(ox), y + float(oy), 4.0 * sigma, w, h)
        if box is None:
            continue
        sy, sx, dx, dy = box
        amp = np.float32(contrast * rng.uniform(0.75, 1.0))
        g = np.exp((dx * dx + dy * dy) * np.float32(-0.5 / (sigma * sigma)))
        img[sy, sx] += amp * g


_STRIP_ROWS: Final = 64


def _workers() -> int:
    """Threads for strip rendering (numpy releases the GIL); at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _base_strip(
    o: _Outline, cfg: PhantomConfig, field_: F32, img: F32, mask: F32, y0: int, y1: int
) -> None:
    """Render breast, skin, texture and pectoral muscle into rows ``y0:y1``."""
    spacing = cfg.spacing_mm
    xe = min(cfg.width, math.ceil(o.depth) + 2)
    x = np.arange(xe, dtype=np.float32)[None, :]
    yv = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(o.yc)
    b = np.where(yv < 0, np.float32(o.b_up), np.float32(o.b_down)).astype(np.float32)
    gx = x * np.float32(1.0 / o.depth**2)
    gy = yv / (b * b)
    s = np.sqrt(x * gx + yv * gy)
    # Distance to the outline in px: (1 - s) / |grad s|, |grad s| = |(gx, gy)| / s.
    grad = np.sqrt(gx * gx + gy * gy)
    dist = (np.float32(1.0) - s) * s / np.maximum(grad, np.float32(1e-12))
    m = np.clip(dist + np.float32(0.5), 0.0, 1.0)  # anti-aliased breast mask
    f = field_[y0:y1, :xe]

    # Glandular tissue concentrates behind the nipple, away from skin and chest wall.
    gland = np.float32(cfg.density + 0.35) - np.float32(2.5) * np.maximum(
        s - np.float32(0.6), np.float32(0.0)
    )
    gland -= np.float32(1.2 / o.depth) * np.abs(x - np.float32(0.45 * o.depth))
    gland += np.float32(0.8) * f
    dense = np.tanh(np.float32(0.9) * gland)
    tissue = (
        np.float32(_FAT + 0.5 * cfg.texture_contrast)
        + np.float32(0.5 * cfg.texture_contrast) * dense
    )
    tissue += np.float32(0.015) * f  # a weak trace of the texture in fat too

    if o.pect_w > 0 and y0 < o.pect_h:
        yq = (np.arange(y0, y1, dtype=np.float32) / np.float32(o.pect_h)) ** np.float32(
            o.pect_gamma
        )
        q = x / np.float32(o.pect_w) + yq[:, None]
        wp = np.clip((np.float32(1.0) - q) * np.float32(o.pect_w / 3.0) + 0.5, 0.0, 1.0)
        pect = np.float32(_PECTORAL) + np.float32(0.03) * f
        tissue += wp * (pect - tissue)

    # Thickness roll-off over ~12 mm inside the skin, and a ~1.5 mm skin line.
    level = np.float32(0.55) + np.float32(0.45) * np.sqrt(
        np.clip(dist * np.float32(spacing / 12.0), 0.0, 1.0)
    )
    skin_px = max(1.0, 1.5 / spacing)
    skin = np.exp(-(((dist - np.float32(skin_px * 0.5)) / np.float32(skin_px)) ** 2))
    tissue -= np.float32(_AIR)
    tissue *= level
    tissue += np.float32(_SKIN) * skin
    tissue *= m
    tissue += np.float32(_AIR)
    img[y0:y1, :xe] = tissue
    img[y0:y1, xe:] = np.float32(_AIR)
    mask[y0:y1, :xe] = m
    mask[y0:y1, xe:] = 0.0


def _noise_strip(
    img: F32,
    out: npt.NDArray[np.uint16],
    cfg: PhantomConfig,
    seq: np.random.SeedSequence,
    y0: int,
    y1: int,
) -> None:
    """Add Poisson-like quantum noise (variance ~ signal) and quantise rows ``y0:y1``."""
    rng = np.random.default_rng(seq)
    v = img[y0:y1]
    sd = np.sqrt(np.maximum(v, np.float32(0.0)) + np.float32(0.002))
    sd *= np.float32(cfg.noise_level)
    sd *= _normal(rng, v.shape)
    sd += v
    sd *= np.float32(cfg.max_value)
    np.clip(sd, 0.0, float(cfg.max_value), out=sd)
    np.rint(sd, out=sd)
    out[y0:y1] = sd


def _render_view(
    breast: _Breast,
    view: str,
    cfg: PhantomConfig,
    seq: np.random.SeedSequence,
    pool: ThreadPoolExecutor,
) -> tuple[npt.NDArray[np.uint16], _ViewTruth, F32]:
    """Pixels, lesion truth and breast mask of one view.

    Rendered with the chest wall at x = 0, then mirrored for R views.
    """
    h, w = cfg.height, cfg.width
    spacing = cfg.spacing_mm
    o = breast.cc if view == "CC" else breast.mlo
    tex_seq, lesion_seq, noise_seq = seq.spawn(3)
    strips = [(y0, min(h, y0 + _STRIP_ROWS)) for y0 in range(0, h, _STRIP_ROWS)]

    field_ = _texture(np.random.default_rng(tex_seq), cfg)
    img = np.empty((h, w), dtype=np.float32)
    mask = np.empty((h, w), dtype=np.float32)

    def base(rows: tuple[int, int]) -> None:
        _base_strip(o, cfg, field_, img, mask, rows[0], rows[1])

    list(pool.map(base, strips))

    rng = np.random.default_rng(lesion_seq)
    truth = _ViewTruth(None, None, None)
    lesion = breast.lesion
    if lesion is not None:
        offset = lesion.ml if view == "CC" else lesion.si
        lx, ly = _position(o, lesion.depth, offset)
        radius = lesion.radius_mm / spacing
        floor = _FAT + 0.8 * cfg.texture_contrast  # glandular tissue
        if lesion.kind == "round_mass":
            _add_round_mass(img, lx, ly, radius, cfg.mass_contrast, floor, rng)
        elif lesion.kind == "spiculated_mass":
            n = int(rng.integers(cfg.spicule_count[0], cfg.spicule_count[1] + 1))
            _add_spiculated_mass(img, lx, ly, radius, cfg.mass_contrast, floor, n, rng)
        else:
            c = lesion.calcs_mm
            col = 1 if view == "CC" else 2
            offsets = np.stack([c[:, 0], c[:, col]], axis=1) / spacing
            _add_calcs(img, lx, ly, offsets, c[:, 3] / spacing, cfg.calc_contrast, rng)
        truth = _ViewTruth(lx, ly, radius)

    pixels = np.empty((h, w), dtype=np.uint16)
    seqs = noise_seq.spawn(len(strips))

    def noise(k: int) -> None:
        _noise_strip(img, pixels, cfg, seqs[k], strips[k][0], strips[k][1])

    list(pool.map(noise, range(len(strips))))

    if breast.laterality == "R":
        pixels = np.ascontiguousarray(pixels[:, ::-1])
        mask = np.ascontiguousarray(mask[:, ::-1])
        if truth.x is not None:
            truth = _ViewTruth(w - 1 - truth.x, truth.y, truth.radius_px)
    return pixels, truth, mask


# --------------------------------------------------------------------------- DICOM


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = meaning
    return item


_VIEW_CODES: Final = {
    "CC": ("399162004", "cranio-caudal"),
    "MLO": ("399368009", "medio-lateral oblique"),
}
# Row \ column directions with the chest wall on the left for L, right for R.
_ORIENTATION: Final = {
    ("L", "CC"): ["A", "R"],
    ("R", "CC"): ["P", "L"],
    ("L", "MLO"): ["A", "FR"],
    ("R", "MLO"): ["P", "FL"],
}


@dataclass(frozen=True)
class _StudyInfo:
    seed: int
    index: int
    study_uid: str
    series_uid: str
    patient_id: str
    patient_name: str
    birth_date: str
    study_date: str
    study_time: str
    accession: str
    age: str


def _window(pixels: npt.NDArray[np.uint16], mask: F32) -> tuple[int, int]:
    sub = pixels[::4, ::4][mask[::4, ::4] > 0.5]
    if sub.size < 16:
        sub = pixels[::4, ::4].ravel()
    lo, hi = (float(v) for v in np.percentile(sub, [0.5, 99.5]))
    width = max(2.0, (hi - lo) * 1.1)
    return round((lo + hi) / 2), round(width)


def _dataset(
    info: _StudyInfo,
    view_name: str,
    pixels: npt.NDArray[np.uint16],
    mask: F32,
    cfg: PhantomConfig,
    sop_uid: str,
) -> Dataset:
    lat, view = view_name[0], view_name[1:]
    spacing = f"{cfg.spacing_mm:.6g}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MG_FOR_PRESENTATION)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CRGATE_PHANTOM1"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = MG_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = info.study_date
    ds.SeriesDate = info.study_date
    ds.AcquisitionDate = info.study_date
    ds.ContentDate = info.study_date
    ds.StudyTime = info.study_time
    ds.SeriesTime = info.study_time
    ds.AcquisitionTime = info.study_time
    ds.ContentTime = info.study_time
    ds.AccessionNumber = info.accession
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "crgate"
    ds.InstitutionName = "crgate synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic screening mammogram (phantom)"
    ds.SeriesDescription = "Phantom MG for presentation"
    ds.ManufacturerModelName = "crgate phantom v1"

    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = info.birth_date
    ds.PatientSex = "F"
    ds.PatientAge = info.age
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic phantom, no real patient"

    ds.BodyPartExamined = "BREAST"
    ds.SoftwareVersions = "crgate-phantom-1"
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.ViewPosition = view
    ds.EstimatedRadiographicMagnificationFactor = "1.0"

    ds.StudyInstanceUID = info.study_uid
    ds.SeriesInstanceUID = info.series_uid
    ds.StudyID = f"{info.index + 1}"[-16:]
    ds.SeriesNumber = 1
    ds.InstanceNumber = VIEWS.index(view_name) + 1
    ds.PatientOrientation = _ORIENTATION[(lat, view)]
    ds.ImageLaterality = lat
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = cfg.height
    ds.Columns = cfg.width
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = cfg.bits_stored
    ds.HighBit = cfg.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    center, width = _window(pixels, mask)
    ds.WindowCenter = str(center)
    ds.WindowWidth = str(width)
    ds.VOILUTFunction = "LINEAR"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"

    ds.AnatomicRegionSequence = Sequence([_code("76752008", "Breast")])
    view_item = _code(*_VIEW_CODES[view])
    view_item.ViewModifierCodeSequence = Sequence()
    ds.ViewCodeSequence = Sequence([view_item])
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.AcquisitionContextSequence = Sequence()

    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _study_info(seed: int, index: int, cfg_key: str) -> _StudyInfo:
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 0]))
    study_day = date(2020, 1, 1) + timedelta(days=int(rng.integers(0, 5 * 365)))
    birth = study_day - timedelta(days=int(rng.integers(40 * 366, 76 * 365)))
    age = study_day.year - birth.year
    age -= (study_day.month, study_day.day) < (birth.month, birth.day)
    secs = int(rng.integers(8 * 3600, 18 * 3600))
    patient_id = f"PH{seed:04d}{index:05d}"
    return _StudyInfo(
        seed=seed,
        index=index,
        study_uid=validate_uid(stable_uid(_UID_NAMESPACE, cfg_key, seed, index, "study")),
        series_uid=validate_uid(stable_uid(_UID_NAMESPACE, cfg_key, seed, index, "series")),
        patient_id=patient_id,
        patient_name=f"PHANTOM^{index:04d}",
        birth_date=birth.strftime("%Y%m%d"),
        study_date=study_day.strftime("%Y%m%d"),
        study_time=f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}",
        accession=f"A{seed % 10**6}-{index}"[:16],
        age=f"{age:03d}Y",
    )


# --------------------------------------------------------------------------- public API


def _check_common(seed: object, malignant_fraction: object, benign_fraction: object) -> None:
    _check(
        isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32,
        f"seed must be an integer in [0, 2**32), got {seed!r}",
    )
    for name, value in (
        ("malignant_fraction", malignant_fraction),
        ("benign_fraction", benign_fraction),
    ):
        _check(
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and 0.0 <= value <= 1.0,
            f"{name} must be a number in [0, 1], got {value!r}",
        )
    assert isinstance(malignant_fraction, int | float)
    assert isinstance(benign_fraction, int | float)
    _check(
        malignant_fraction + benign_fraction <= 1.0 + 1e-12,
        f"malignant_fraction + benign_fraction must be at most 1, got "
        f"{malignant_fraction} + {benign_fraction}",
    )


def _make_view(
    info: _StudyInfo,
    breast: _Breast,
    name: str,
    cfg: PhantomConfig,
    cfg_key: str,
    seq: np.random.SeedSequence,
    pool: ThreadPoolExecutor,
) -> tuple[Dataset, TruthRow]:
    pixels, vt, mask = _render_view(breast, name[1:], cfg, seq, pool)
    sop_uid = validate_uid(stable_uid(_UID_NAMESPACE, cfg_key, info.seed, info.index, name))
    ds = _dataset(info, name, pixels, mask, cfg, sop_uid)
    row = TruthRow(
        study_uid=info.study_uid,
        patient_id=info.patient_id,
        laterality=name[0],
        view=name[1:],
        sop_instance_uid=sop_uid,
        file=f"{info.study_uid}/{name}.dcm",
        label=breast.label,
        lesion_kind=breast.lesion.kind if breast.lesion is not None else "none",
        center_x=None if vt.x is None else round(vt.x, 2),
        center_y=None if vt.y is None else round(vt.y, 2),
        radius_px=None if vt.radius_px is None else round(vt.radius_px, 2),
    )
    return ds, row


def generate_study(
    index: int,
    *,
    seed: int = 0,
    config: PhantomConfig = DEFAULT_CONFIG,
    malignant_fraction: float = 0.5,
    benign_fraction: float = 0.25,
) -> PhantomStudy:
    """Generate study ``index`` of run ``seed``: four views and their ground truth."""
    _check_common(seed, malignant_fraction, benign_fraction)
    _check(
        isinstance(index, int) and not isinstance(index, bool) and 0 <= index < 10**8,
        f"index must be an integer in [0, 10**8), got {index!r}",
    )
    _check(isinstance(config, PhantomConfig), "config must be a PhantomConfig")
    cfg_key = repr(sorted(asdict(config).items()))
    cfg_key += f"|{float(malignant_fraction)!r}|{float(benign_fraction)!r}"
    info = _study_info(seed, index, cfg_key)
    kinds = _labels(seed, index, float(malignant_fraction), float(benign_fraction))
    breasts = {lat: _make_breast(seed, index, i, kinds[lat], config) for i, lat in enumerate("LR")}
    datasets: dict[str, Dataset] = {}
    truth: list[TruthRow] = []
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        for v_index, name in enumerate(VIEWS):
            seq = np.random.SeedSequence([seed, index, 3, v_index])
            ds, row = _make_view(info, breasts[name[0]], name, config, cfg_key, seq, pool)
            datasets[name] = ds
            truth.append(row)
    return PhantomStudy(study_uid=info.study_uid, datasets=datasets, truth=truth)


def _truth_csv(rows: list[TruthRow]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TRUTH_FIELDS)
    for row in rows:
        writer.writerow(["" if v is None else v for v in (getattr(row, f) for f in TRUTH_FIELDS)])
    return buf.getvalue().encode("utf-8")


def write_studies(
    out_dir: Path,
    n_studies: int,
    *,
    seed: int = 0,
    config: PhantomConfig = DEFAULT_CONFIG,
    malignant_fraction: float = 0.5,
    benign_fraction: float = 0.25,
    on_study: Callable[[int], None] | None = None,
) -> list[TruthRow]:
    """Write ``n_studies`` phantom studies under ``out_dir`` plus ``truth.csv``.

    Files are ``out_dir/<study_uid>/{LCC,LMLO,RCC,RMLO}.dcm``; every file is
    written atomically, ``truth.csv`` last. ``on_study(i)`` runs after study i.
    """
    _check(
        isinstance(n_studies, int) and not isinstance(n_studies, bool) and n_studies >= 1,
        f"n_studies must be an integer >= 1, got {n_studies!r}",
    )
    _check_common(seed, malignant_fraction, benign_fraction)
    _check(n_studies <= 10**8, f"n_studies must be at most 10**8, got {n_studies}")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create output directory ({exc})") from None
    rows: list[TruthRow] = []
    for i in range(n_studies):
        study = generate_study(
            i,
            seed=seed,
            config=config,
            malignant_fraction=malignant_fraction,
            benign_fraction=benign_fraction,
        )
        study_dir = out_dir / study.study_uid
        try:
            study_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{study_dir}: cannot create directory ({exc})") from None
        for name in VIEWS:
            write_dataset(study.datasets[name], study_dir / f"{name}.dcm")
        rows.extend(study.truth)
        del study
        if on_study is not None:
            on_study(i)
    target = out_dir / "truth.csv"
    try:
        with atomic_output(target) as fh:
            fh.write(_truth_csv(rows))
    except OSError as exc:
        raise OutputError(f"{target}: cannot write output ({exc.strerror or exc})") from None
    return rows
