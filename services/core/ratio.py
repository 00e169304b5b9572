"""The compression ratio as a checked value: parsed once where a request enters.

CR = uncompressed Pixel Data bytes / stored codestream bytes; 1 means lossless. The API, the
CLI and the policy editor turn what a person typed into a :class:`CompressionRatio` (or an
InvalidParameter naming what is allowed); the layers below take the type and do not check again.
"""

from __future__ import annotations

import math

from services.core.errors import InvalidParameter

MAX_CR = 1_000_000.0


class CompressionRatio(float):
    """A finite compression ratio from 1 (lossless) to :data:`MAX_CR`."""

    __slots__ = ()

    def __new__(cls, value: float | str) -> CompressionRatio:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InvalidParameter(f"compression ratio {value!r} is not a number") from None
        if math.isnan(number) or math.isinf(number) or number < 1 or number > MAX_CR:
            raise InvalidParameter(
                f"compression ratio {value!r} is out of range: use 1 (lossless) "
                f"or a number > 1 up to {MAX_CR:g}"
            )
        return super().__new__(cls, number)

    @property
    def lossless(self) -> bool:
        return float(self) == 1.0

    def __repr__(self) -> str:
        return f"CompressionRatio({float(self)!r})"


def validate_cr(value: float | str) -> CompressionRatio:
    """``value`` as a CompressionRatio, or InvalidParameter saying what is allowed."""
    return CompressionRatio(value)


#: the CRs of the seed study (its CR sweep and its training experiments), ascending
STUDY_CRS: tuple[float, ...] = (1, 15, 20, 25, 50, 100, 500, 1000, 5000, 10000, 11000)
STUDY_CRS_TEXT = ",".join(f"{cr:g}" for cr in STUDY_CRS)


def parse_cr_list(text: str, what: str = "CR list") -> list[CompressionRatio]:
    """``"1,15,25"`` -> the CRs in the order given; InvalidParameter naming ``what`` and the
    entry that is wrong (an empty list or entry, a value that is not a CR)."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise InvalidParameter(f"{what} is empty: give compression ratios like 1,25,100")
    values = []
    for part in parts:
        if not part:
            raise InvalidParameter(f"{what} {text!r} has an empty entry")
        try:
            values.append(CompressionRatio(part))
        except InvalidParameter as exc:
            raise InvalidParameter(f"{what} {text!r}: {exc}") from None
    return values
