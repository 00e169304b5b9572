"""Request parameters read one way everywhere: counts, and text headed for the index.

``str.isdigit`` accepts superscripts (``²``) that ``int`` refuses, integers above 2^63 overflow
SQLite and PostgreSQL, and PostgreSQL refuses NUL in text: each was a 500 once.
"""

from __future__ import annotations

import re

from services.core.errors import InvalidParameter

MAX_COUNT = 2**63 - 1  # the largest integer SQLite and a PostgreSQL bigint hold
_DIGITS = re.compile(r"[0-9]{1,19}")


def parse_count(text: str, name: str, *, minimum: int = 0, maximum: int = MAX_COUNT) -> int:
    """``text`` (ASCII digits only) as an integer from ``minimum`` to ``maximum``;
    InvalidParameter naming ``name`` otherwise."""
    if _DIGITS.fullmatch(text) and minimum <= int(text) <= maximum:
        return int(text)
    raise InvalidParameter(
        f"{name} must be an integer from {minimum} to {maximum}, not {text[:40]!r}"
    )


def check_text(value: str, name: str) -> str:
    """``value`` unless it holds a NUL character (InvalidParameter naming ``name``)."""
    if "\x00" in value:
        raise InvalidParameter(f"{name} contains a NUL character (%00 in a URL); remove it")
    return value
