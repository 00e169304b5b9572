"""Element values as plain Python."""

from __future__ import annotations

from typing import Any


def as_strings(value: Any) -> list[str]:
    """A single or multi-valued element value as a list of strings ([] when empty)."""
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return [str(value)]
    return [str(v) for v in value]
