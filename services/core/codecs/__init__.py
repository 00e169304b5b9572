"""Output codecs, keyed by transfer syntax UID.

crgate writes JPEG 2000: lossless (reversible 5/3) for CR 1 and irreversible 9/7 for CR > 1.
Input decoding is pydicom's, with the pylibjpeg plugins installed (see dicom/pixels.py).
"""

from __future__ import annotations

from enum import StrEnum

from pydicom.uid import JPEG2000, UID, JPEG2000Lossless

from services.core.errors import InvalidParameter


class OutputSyntax(StrEnum):
    """The transfer syntaxes crgate writes, by their CLI/API names."""

    J2K = "j2k"
    J2K_LOSSLESS = "j2k-lossless"

    @property
    def uid(self) -> UID:
        return JPEG2000Lossless if self is OutputSyntax.J2K_LOSSLESS else JPEG2000

    @property
    def lossless(self) -> bool:
        return self is OutputSyntax.J2K_LOSSLESS

    @classmethod
    def for_cr(cls, cr: float, requested: OutputSyntax | str | None = None) -> OutputSyntax:
        """The syntax for a CR: lossless for CR 1, irreversible above; checks a requested one."""
        if requested is None:
            return cls.J2K_LOSSLESS if cr == 1 else cls.J2K
        try:
            syntax = cls(requested)
        except ValueError:
            names = ", ".join(s.value for s in cls)
            raise InvalidParameter(f"unknown syntax {requested!r}: use one of {names}") from None
        if syntax.lossless and cr != 1:
            raise InvalidParameter(
                f"syntax j2k-lossless cannot give CR {cr:g}: use --cr 1 or --syntax j2k"
            )
        if not syntax.lossless and cr == 1:
            raise InvalidParameter("CR 1 means lossless: use --syntax j2k-lossless or a CR > 1")
        return syntax
