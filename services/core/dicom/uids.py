"""UID creation and validation (PS3.5 section 9)."""

from __future__ import annotations

import hashlib
import re
import uuid

from services.core.errors import InvalidUID

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def validate_uid(value: str, what: str = "UID") -> str:
    """Return ``value`` if it is a valid DICOM UID, else raise InvalidUID naming ``what``.

    Checked before a UID touches a file path.
    """
    if not isinstance(value, str) or len(value) > 64 or not _UID_RE.match(value):
        raise InvalidUID(
            f"{what} {loggable_uid(value)} is not a valid DICOM UID "
            "(digits and dots, no leading zeros, at most 64 characters)"
        )
    return value


def loggable_uid(value: object) -> str:
    """``value`` quoted when it is one short token (digits, letters, dots, hyphens, slashes: a
    UID, a typo of one, a path trick), else only its length.

    A malformed UID can hold whatever followed it in the file (a length that swallows the
    patient's name, ID and birth date, with the binary element headers between them): such a
    value never reaches a log or an error text.
    """
    text = str(value)
    if _LOGGABLE_RE.fullmatch(text):
        return repr(text)
    return f"(a value of {len(text)} characters, withheld: not a UID)"


_LOGGABLE_RE = re.compile(r"[0-9A-Za-z._/-]{0,64}")


def new_uid() -> str:
    """A fresh, globally unique UID under the UUID-derived root 2.25 (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid4().int}"


def stable_uid(*parts: object) -> str:
    """A deterministic UID under 2.25 derived from ``parts`` (for reproducible phantoms)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"
