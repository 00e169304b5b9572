"""Errors raised by crgate's core; the edges map them to exit codes, HTTP or DICOM statuses.

CrgateError                  base: a message a person can act on
 +-- InvalidInput            the caller's input is wrong (bad file, parameter, UID)
 |    +-- NotDicom           the bytes are not a DICOM Part 10 file (or are truncated)
 |    +-- NoPixelData        a DICOM file without an image
 |    +-- InvalidParameter   a parameter out of range (CR <= 0, NaN, unknown syntax)
 |    +-- InvalidUID         a UID that is not a valid DICOM UID
 |    +-- TooLarge           over a configured size limit (inflated size, PDU, frame list)
 +-- CodecError              encoding or decoding failed
 |    +-- UnsupportedSyntax  no installed decoder handles the transfer syntax
 |    +-- CodecUnavailable   a required codec library is missing (names the package)
 +-- OutputError             an output could not be written (nothing partial is left)
 +-- NotFound                a referenced object does not exist
 +-- Conflict                the request conflicts with stored state
"""

from __future__ import annotations

from typing import Any


class CrgateError(Exception):
    """Base of every error crgate raises on purpose."""

    exit_code = 1

    @property
    def details(self) -> dict[str, Any]:
        """Figures a client can act on besides the message (the edges add them to the answer)."""
        return {}


class InvalidInput(CrgateError):
    exit_code = 2


class NotDicom(InvalidInput):
    pass


class NoPixelData(InvalidInput):
    pass


class InvalidParameter(InvalidInput):
    pass


class InvalidUID(InvalidInput):
    pass


class TooLarge(InvalidInput):
    """Over a size limit that keeps memory bounded (the message names the setting)."""


class CodecError(CrgateError):
    exit_code = 3


class UnsupportedSyntax(CodecError):
    pass


class CodecUnavailable(CodecError):
    exit_code = 4


class OutputError(CrgateError):
    exit_code = 5


class NotFound(CrgateError):
    exit_code = 6


class Conflict(CrgateError):
    exit_code = 7


class Forbidden(CrgateError):
    """The caller's role may not do this (an operator asking for a CR above the ceiling)."""

    exit_code = 8

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self._details = details

    @property
    def details(self) -> dict[str, Any]:
        return dict(self._details)
