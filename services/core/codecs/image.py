"""What every output codec shares: the pixel layout it encodes, the encoded image it returns,
and how a compression ratio is counted.

CR = uncompressed Pixel Data bytes (rows x cols x samples x frames x Bits Allocated / 8) divided
by the encapsulated codestream bytes (each frame's codestream, padded to even length as stored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

CR_TOLERANCE = 0.02
"""Relative distance between achieved and target CR accepted as "reached" (measured exactly)."""


@dataclass(frozen=True)
class PixelLayout:
    """What the codec needs to know about the pixels besides the array itself."""

    rows: int
    columns: int
    samples: int
    frames: int
    bits_allocated: int
    bits_stored: int
    signed: bool

    @property
    def uncompressed_bytes(self) -> int:
        bits = self.rows * self.columns * self.samples * self.frames * self.bits_allocated
        return (bits + 7) // 8

    @property
    def declared_bytes(self) -> float:
        """Bytes OpenJPEG's rate is relative to: the precision the codestream declares."""
        return self.rows * self.columns * self.samples * self.frames * self.bits_stored / 8


@dataclass(frozen=True)
class EncodedImage:
    """The codestreams of every frame and what they achieved."""

    frames: list[bytes]
    lossless: bool
    target_cr: float
    achieved_cr: float
    reached: bool
    note: str | None
    attempts: int
    step: float | None = None
    """HTJ2K: the quantisation step the search settled on (None for reversible coding and for
    OpenJPEG, whose rate is not a step)."""

    @property
    def compressed_bytes(self) -> int:
        return stored_size(self.frames)


def stored_size(codestreams: Sequence[bytes]) -> int:
    """Bytes the codestreams take as encapsulated fragments (each padded to an even length)."""
    return sum(len(c) + (len(c) & 1) for c in codestreams)
