"""The errors of a retrieve request: what cannot be sent, and malformed query parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.core.errors import CodecError, InvalidInput, UnsupportedSyntax


class NotAcceptable(UnsupportedSyntax):
    """Nothing the client accepts can be produced; ``offered`` lists what can."""

    def __init__(self, message: str, offered: Sequence[str]) -> None:
        super().__init__(f"{message}; offered: {', '.join(offered)}")
        self.offered = list(offered)

    @property
    def details(self) -> dict[str, Any]:
        return {"offered": self.offered}


class InvalidQuery(InvalidInput):
    """A malformed frame list, window, viewport, quality or bulk data tag (HTTP 400)."""


class StoredMalformed(CodecError):
    """A stored file that fails ingest's checks (stored before them, or changed since): its
    pixels or elements cannot be served (HTTP 422)."""
