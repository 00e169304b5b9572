"""Output codecs: one registry entry per transfer syntax crgate writes.

Like pydicom's pixel-data registry, each :class:`OutputCodec` says what it is (transfer syntax,
lossless or lossy, the Lossy Image Compression Method it records), whether it can run here
(:meth:`OutputCodec.is_available`, and the package to install when not), and encodes a whole
image to a target CR. The pipeline, derive, retrieval and the CLI ask the registry; adding a
syntax means adding an entry here.

- ``j2k-lossless`` (1.2.840.10008.1.2.4.90) and ``j2k`` (.91): OpenJPEG through glymur's C
  binding, rate searched (:mod:`.jpeg2000`).
- ``htj2k-lossless`` (.201), ``htj2k-rpcl`` (.202: RPCL, TLM, a small lowest resolution) and
  ``htj2k`` (.203, lossy): OpenJPH through imagecodecs, step searched (:mod:`.htj2k`).

Every codestream is decoded by OpenJPEG (:func:`.openjpeg.decode_codestream`), HT included.
Input decoding is pydicom's, with the pylibjpeg plugins installed (see dicom/pixels.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy.typing as npt
from pydicom.uid import UID

from services.core.codecs import htj2k, jpeg2000
from services.core.codecs.image import EncodedImage, PixelLayout
from services.core.codecs.openjpeg import openjpeg_available
from services.core.errors import CodecUnavailable, InvalidParameter

SYNTAX_HELP = (
    "output syntax: j2k or htj2k (lossy, CR > 1), j2k-lossless, htj2k-lossless or htj2k-rpcl "
    "(CR 1); left out, JPEG 2000 by the CR"
)

Encoder = Callable[[Sequence[npt.NDArray[Any]], PixelLayout, float, int], EncodedImage]
"""(frames, layout, target CR, threads) -> the encoded image."""


@dataclass(frozen=True)
class OutputCodec:
    """One output transfer syntax and how crgate writes it."""

    name: str
    uid: UID
    title: str
    """What the output is called in descriptions, e.g. "JPEG 2000"."""
    method: str
    """Lossy Image Compression Method (PS3.3 C.7.6.1.1.5.1) recorded for lossy output."""
    lossless: bool
    """Reversible coding only (CR 1); a lossy codec takes CR > 1."""
    lossless_name: str
    """The lossless syntax of the same family: written when it fits a lossy budget."""
    lossy_name: str
    """The lossy syntax of the same family: what to use for CR > 1."""
    package: str
    """What to install when :meth:`is_available` is False."""
    available: Callable[[], bool]
    encoder: Encoder

    def is_available(self) -> bool:
        return self.available()

    def require(self) -> None:
        """Raise CodecUnavailable naming the package when this codec cannot run here."""
        if not self.is_available():
            raise CodecUnavailable(f"{self.name} ({self.title}) is not available: {self.package}")

    def encode(
        self,
        frames: Sequence[npt.NDArray[Any]],
        layout: PixelLayout,
        target_cr: float,
        *,
        threads: int = 0,
    ) -> EncodedImage:
        """Every frame encoded: reversibly for a lossless codec, else to ``target_cr``."""
        self.require()
        return self.encoder(frames, layout, target_cr, threads)


class OutputSyntax(StrEnum):
    """The transfer syntaxes crgate writes, by their CLI/API names."""

    J2K = "j2k"
    J2K_LOSSLESS = "j2k-lossless"
    HTJ2K = "htj2k"
    HTJ2K_LOSSLESS = "htj2k-lossless"
    HTJ2K_RPCL = "htj2k-rpcl"

    @property
    def codec(self) -> OutputCodec:
        return CODECS[self]

    @property
    def uid(self) -> UID:
        return self.codec.uid

    @property
    def lossless(self) -> bool:
        return self.codec.lossless

    @property
    def lossless_sibling(self) -> OutputSyntax:
        """The lossless syntax of this one's family (itself when lossless)."""
        return OutputSyntax(self.codec.lossless_name)

    @classmethod
    def parse(cls, requested: OutputSyntax | str) -> OutputSyntax:
        try:
            return cls(requested)
        except ValueError:
            names = ", ".join(s.value for s in cls)
            raise InvalidParameter(f"unknown syntax {requested!r}: use one of {names}") from None

    @classmethod
    def for_cr(cls, cr: float, requested: OutputSyntax | str | None = None) -> OutputSyntax:
        """The syntax for a CR: JPEG 2000 lossless for CR 1 and irreversible above, unless one is
        requested; a requested one must suit the CR and be available here."""
        if requested is None:
            return cls.J2K_LOSSLESS if cr == 1 else cls.J2K
        syntax = cls.parse(requested)
        codec = syntax.codec
        if syntax.lossless and cr != 1:
            raise InvalidParameter(
                f"syntax {syntax.value} is lossless and cannot give CR {cr:g}: "
                f"use CR 1 or syntax {codec.lossy_name}"
            )
        if not syntax.lossless and cr == 1:
            raise InvalidParameter(
                f"CR 1 means lossless: use syntax {codec.lossless_name} or a CR above 1"
            )
        codec.require()
        return syntax

    @classmethod
    def from_uid(cls, uid: str) -> OutputSyntax | None:
        """The syntax crgate writes with this transfer syntax UID, if any."""
        return next((s for s in cls if s.uid == uid), None)

    def holds(self, stored: str) -> bool:
        """True when codestreams stored in ``stored`` are valid in this syntax as they are
        (a reversible JPEG 2000 codestream is valid JPEG 2000; an RPCL HT one is valid HT)."""
        return stored == self.uid or stored in _ALSO_VALID_IN.get(self.value, ())


def _j2k(lossless: bool) -> Encoder:
    def encode(
        frames: Sequence[npt.NDArray[Any]], layout: PixelLayout, cr: float, threads: int
    ) -> EncodedImage:
        return jpeg2000.encode_image(frames, layout, cr, lossless=lossless, threads=threads)

    return encode


def _ht(lossless: bool, rpcl: bool = False) -> Encoder:
    def encode(
        frames: Sequence[npt.NDArray[Any]], layout: PixelLayout, cr: float, threads: int
    ) -> EncodedImage:
        return htj2k.encode_image(frames, layout, cr, lossless=lossless, rpcl=rpcl)

    return encode


_ALSO_VALID_IN = {
    "j2k": ("1.2.840.10008.1.2.4.90",),
    "htj2k": ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202"),
    "htj2k-lossless": ("1.2.840.10008.1.2.4.202",),
}
"""Syntax name -> stored syntaxes whose codestreams it holds as they are."""

_OPENJPEG = (
    "install the Debian package libopenjp2-7 (OpenJPEG >= 2.4) and the Python package glymur"
)
_OPENJPH = "pip install imagecodecs (its bundled OpenJPH writes HTJ2K)"

CODECS: dict[OutputSyntax, OutputCodec] = {
    OutputSyntax.J2K_LOSSLESS: OutputCodec(
        "j2k-lossless", UID("1.2.840.10008.1.2.4.90"), "JPEG 2000", "ISO_15444_1", True,
        "j2k-lossless", "j2k", _OPENJPEG, openjpeg_available, _j2k(True),
    ),
    OutputSyntax.J2K: OutputCodec(
        "j2k", UID("1.2.840.10008.1.2.4.91"), "JPEG 2000", "ISO_15444_1", False,
        "j2k-lossless", "j2k", _OPENJPEG, openjpeg_available, _j2k(False),
    ),
    OutputSyntax.HTJ2K_LOSSLESS: OutputCodec(
        "htj2k-lossless", UID("1.2.840.10008.1.2.4.201"), "HTJ2K", "ISO_15444_15", True,
        "htj2k-lossless", "htj2k", _OPENJPH, htj2k.is_available, _ht(True),
    ),
    OutputSyntax.HTJ2K_RPCL: OutputCodec(
        "htj2k-rpcl", UID("1.2.840.10008.1.2.4.202"), "HTJ2K", "ISO_15444_15", True,
        "htj2k-rpcl", "htj2k", _OPENJPH, htj2k.is_available, _ht(True, rpcl=True),
    ),
    OutputSyntax.HTJ2K: OutputCodec(
        "htj2k", UID("1.2.840.10008.1.2.4.203"), "HTJ2K", "ISO_15444_15", False,
        "htj2k-lossless", "htj2k", _OPENJPH, htj2k.is_available, _ht(False),
    ),
}  # fmt: skip
