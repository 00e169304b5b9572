"""Compressed copies for the CR study, cached on disk, and what they cost in image quality.

A copy is the JPEG 2000 codestream of one image at one target CR. The cache keeps the
codestream itself (small: 1/CR of the image) with its quality against the original (achieved
CR, PSNR, SSIM, max error), in ``<root>/<sha[:2]>/<sha>-<encoder tag>-cr<CR>.npz`` where
``sha`` is the sha256 of the image file's bytes and the encoder tag names the encoder, its
settings and the OpenJPEG version: a changed file or encoder misses the cache, a copied
folder hits it. Decoding a cached copy takes milliseconds; the model input is made from the
decoded pixels each run, so one cache serves every model and preprocessing.

Both encoders are the service's :func:`~services.core.codecs.jpeg2000.encode_image`, with two
settings: ``quick`` (default) is the training pipeline's
(:func:`services.lab.training.data.quick_encode`: one encode at the predicted rate, corrected
only while more than 5 % off), so the study sees the same copies the models were trained on;
``gateway`` is the service's own (within 2 %, slower at CR >= 5000), for the exact bytes a
policy would store. CR 1 is the original pixels (PSNR 100 dB, SSIM 1).
Entries are written by rename (never seen half written); an unreadable entry counts as a miss.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.core import metrics
from services.core.codecs.image import CR_TOLERANCE, PixelLayout
from services.core.codecs.jpeg2000 import encode_image
from services.core.codecs.openjpeg import decode_codestream, openjpeg_version
from services.core.dicom.io import read_dataset
from services.core.dicom.pixels import load_pixels
from services.core.errors import InvalidInput, InvalidParameter, OutputError
from services.core.inference.breasts import window_of
from services.core.inference.card import file_sha256
from services.lab.training.data import ENCODER_TAG, quick_encode

ENCODERS = ("quick", "gateway")
REACHED_TOLERANCE = 0.05  # a copy within 5 % of its target CR (or beyond it) reached it


@dataclass(frozen=True)
class Quality:
    """What one copy cost: its achieved CR and its quality against the original."""

    achieved_cr: float
    psnr_db: float
    ssim: float | None
    max_abs_error: int
    bytes_out: int

    def reached(self, target: float) -> bool:
        return self.achieved_cr >= target * (1 - REACHED_TOLERANCE)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ViewCopy:
    """One view at one CR: decoded pixels as a reader of the copy sees them."""

    pixels: npt.NDArray[Any]
    bits_stored: int
    photometric: str
    window: tuple[float, float] | None
    quality: Quality
    cached: bool  # the copy came from the cache (always True at CR 1: nothing to compress)


@cache
def encoder_tag(encoder: str) -> str:
    """The encoder, its settings and the OpenJPEG version, as part of the cache key."""
    if encoder == "quick":
        base = ENCODER_TAG
    elif encoder == "gateway":
        base = f"gateway-{CR_TOLERANCE:g}"
    else:
        raise InvalidParameter(f"encoder {encoder!r}: use one of {', '.join(ENCODERS)}")
    return f"{base}-ojp{openjpeg_version()}"


def encode(frame: npt.NDArray[Any], layout: PixelLayout, cr: float, encoder: str) -> bytes:
    """One codestream of ``frame`` near ``cr`` with ``encoder``."""
    if encoder == "quick":
        stream, _ = quick_encode(frame, layout, cr)
        return stream
    encoded = encode_image([frame], layout, cr, lossless=False, threads=1)
    return encoded.frames[0]


class CopyCache:
    """Codestreams and their quality on disk (see the module docstring)."""

    def __init__(self, root: Path, encoder: str = "quick") -> None:
        self.root = root
        self.encoder = encoder
        self.tag = encoder_tag(encoder)

    def path(self, sha: str, cr: float) -> Path:
        return self.root / sha[:2] / f"{sha}-{self.tag}-cr{cr:g}.npz"

    def load(self, sha: str, cr: float) -> tuple[bytes, Quality] | None:
        path = self.path(sha, cr)
        try:
            with np.load(path) as data:
                ssim = float(data["ssim"])
                quality = Quality(
                    achieved_cr=float(data["achieved_cr"]),
                    psnr_db=float(data["psnr_db"]),
                    ssim=None if np.isnan(ssim) else ssim,
                    max_abs_error=int(data["max_abs_error"]),
                    bytes_out=int(data["bytes_out"]),
                )
                return bytes(data["codestream"].tobytes()), quality
        except (OSError, KeyError, ValueError, EOFError):  # absent or damaged: a miss
            return None

    def store(self, sha: str, cr: float, codestream: bytes, quality: Quality) -> None:
        path = self.path(sha, cr)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    codestream=np.frombuffer(codestream, dtype=np.uint8),
                    achieved_cr=quality.achieved_cr,
                    psnr_db=quality.psnr_db,
                    ssim=np.nan if quality.ssim is None else quality.ssim,
                    max_abs_error=quality.max_abs_error,
                    bytes_out=quality.bytes_out,
                )
            Path(tmp).replace(path)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write to the copy cache ({exc})") from None

    def view(self, file: Path, cr: float) -> ViewCopy:
        """``file``'s image at ``cr``: from the cache, or compressed, measured and cached."""
        ds = read_dataset(file)
        pixels = load_pixels(ds, str(file))
        layout = pixels.layout
        if layout.frames != 1 or layout.samples != 1:
            raise InvalidInput(f"{file}: the study reads single-frame greyscale images only")
        original = pixels.frames[0]
        window = window_of(ds)
        if cr == 1:
            exact = Quality(1.0, metrics.EXACT_COPY_PSNR_DB, 1.0, 0, layout.uncompressed_bytes)
            return ViewCopy(
                original, layout.bits_stored, pixels.photometric, window, exact, cached=True
            )
        sha = file_sha256(file)
        found = self.load(sha, cr)
        if found is not None:
            stream, quality = found
            decoded = decode_codestream(stream, 1).reshape(original.shape)
            return ViewCopy(
                decoded, layout.bits_stored, pixels.photometric, window, quality, cached=True
            )
        stream = encode(original, layout, cr, self.encoder)
        decoded = decode_codestream(stream, 1).reshape(original.shape)
        quality = measure(original, decoded, layout, len(stream) + (len(stream) & 1))
        self.store(sha, cr, stream, quality)
        return ViewCopy(
            decoded, layout.bits_stored, pixels.photometric, window, quality, cached=False
        )


def measure(
    original: npt.NDArray[Any], decoded: npt.NDArray[Any], layout: PixelLayout, size: int
) -> Quality:
    """Quality of ``decoded`` against ``original`` (``size``: the stored codestream bytes)."""
    if min(layout.rows, layout.columns) < metrics.SSIM_WINDOW:
        ssim: float | None = None
        psnr = metrics.psnr(original, decoded, layout.bits_stored)
        max_err = metrics.max_abs_error(original, decoded)
    else:
        q = metrics.compare(original, decoded, bits_stored=layout.bits_stored, samples_per_pixel=1)
        psnr, ssim, max_err = q.psnr_db, q.ssim, q.max_abs_error
    return Quality(
        achieved_cr=layout.uncompressed_bytes / size,
        psnr_db=float(psnr),
        ssim=None if ssim is None else float(ssim),
        max_abs_error=int(max_err),
        bytes_out=size,
    )
