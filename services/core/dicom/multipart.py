"""multipart/related (RFC 2046, RFC 2387) as DICOMweb uses it (PS3.18 8.6.1.2).

Reading: ``MultipartParser`` is incremental. ``feed()`` takes the body in chunks of any size and
returns events (a part's headers, a piece of its body, its end); memory stays bounded by the
chunk size plus the delimiter length, whatever the size of a part. ``close()`` raises when the
body ended before the closing delimiter. Framing errors raise InvalidInput.

Writing: ``new_boundary`` (or ``stable_boundary``) and ``iter_multipart`` build a body part by
part (WADO-RS responses); the multipart Content-Type is written with ``mediatype.format_media_type``
(``content_type`` is its shorthand with always-quoted extra parameters).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum, auto

from services.core.dicom.mediatype import format_media_type, is_token
from services.core.errors import InvalidInput

RELATED = "multipart/related"
MAX_HEADER_BYTES = 16 * 1024  # all header lines of one part
_BCHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? ")


# -- boundaries -----------------------------------------------------------------------------------


def boundary_of(params: Mapping[str, str]) -> str:
    """The ``boundary`` parameter, checked against RFC 2046's grammar (1-70 bchars)."""
    boundary = params.get("boundary")
    if boundary is None:
        raise InvalidInput("the multipart Content-Type has no boundary parameter")
    if not 1 <= len(boundary) <= 70:
        raise InvalidInput("the multipart boundary must be 1 to 70 characters long")
    if any(c not in _BCHARS for c in boundary) or boundary.endswith(" "):
        raise InvalidInput(
            "the multipart boundary contains characters RFC 2046 does not allow "
            "(letters, digits and '()+_,-./:=? only, not ending in a space)"
        )
    return boundary


# -- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartStart:
    """A part begins; header names are lower-cased."""

    headers: dict[str, str]

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd


class _State(Enum):
    PREAMBLE = auto()
    AFTER_DELIMITER = auto()
    HEADERS = auto()
    BODY = auto()
    EPILOGUE = auto()


class MultipartParser:
    """Incremental multipart parser: ``feed()`` chunks, collect events, ``close()`` at the end."""

    def __init__(self, boundary: str) -> None:
        self._delimiter = b"\r\n--" + boundary.encode("ascii")
        # the first delimiter may start the body without a CRLF before it
        self._buffer = bytearray(b"\r\n")
        self._state = _State.PREAMBLE
        self.parts = 0  # parts started so far

    @property
    def complete(self) -> bool:
        """True once the closing delimiter has been read."""
        return self._state is _State.EPILOGUE

    def feed(self, chunk: bytes) -> list[Event]:
        if self._state is _State.EPILOGUE:
            return []  # the epilogue is ignored (RFC 2046)
        self._buffer += chunk
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def close(self) -> None:
        """Raise InvalidInput unless the closing delimiter was read."""
        if self._state is _State.EPILOGUE:
            return
        if self._state is _State.PREAMBLE:
            raise InvalidInput(
                "the request body does not contain the boundary named in its Content-Type"
            )
        raise InvalidInput(
            f"the multipart body ends inside part {self.parts} (no closing boundary "
            "'--<boundary>--'): the request is incomplete"
        )

    # one step of the state machine; False when more input is needed
    def _step(self, events: list[Event]) -> bool:
        buf, delim = self._buffer, self._delimiter
        if self._state is _State.PREAMBLE:
            at = buf.find(delim)
            if at < 0:
                del buf[: max(0, len(buf) - len(delim) + 1)]
                return False
            del buf[: at + len(delim)]
            self._state = _State.AFTER_DELIMITER
            return True
        if self._state is _State.AFTER_DELIMITER:
            return self._after_delimiter(events)
        if self._state is _State.HEADERS:
            return self._headers(events)
        # BODY
        at = buf.find(delim)
        if at < 0:
            keep = len(delim) - 1
            if len(buf) > keep:
                events.append(PartData(bytes(buf[: len(buf) - keep])))
                del buf[: len(buf) - keep]
            return False
        if at:
            events.append(PartData(bytes(buf[:at])))
        events.append(PartEnd())
        del buf[: at + len(delim)]
        self._state = _State.AFTER_DELIMITER
        return True

    def _after_delimiter(self, events: list[Event]) -> bool:
        buf = self._buffer
        if len(buf) < 2:
            return False
        if buf[:2] == b"--":
            self._state = _State.EPILOGUE
            buf.clear()
            return False
        line_end = buf.find(b"\r\n")
        if line_end < 0:
            if len(buf) > 1024:
                raise InvalidInput("a multipart boundary line does not end with CRLF")
            return False
        if buf[:line_end].strip(b" \t"):  # only transport padding may follow the boundary
            raise InvalidInput(
                "a line starts with the boundary but continues with other characters: "
                "the boundary does not match the body's delimiters"
            )
        del buf[: line_end + 2]
        self._state = _State.HEADERS
        self.parts += 1
        return True

    def _headers(self, events: list[Event]) -> bool:
        buf = self._buffer
        if buf[:2] == b"\r\n":  # a part without headers
            block = b""
            del buf[:2]
        else:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise InvalidInput(
                        f"the headers of part {self.parts} exceed {MAX_HEADER_BYTES} bytes"
                    )
                return False
            if end > MAX_HEADER_BYTES:
                raise InvalidInput(
                    f"the headers of part {self.parts} exceed {MAX_HEADER_BYTES} bytes"
                )
            block = bytes(buf[:end])
            del buf[: end + 4]
        events.append(PartStart(_parse_headers(block, self.parts)))
        self._state = _State.BODY
        return True


def _parse_headers(block: bytes, part: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    name = ""
    for raw in block.split(b"\r\n") if block else []:
        line = raw.decode("latin-1")
        if line[:1] in (" ", "\t") and name:  # obsolete line folding
            headers[name] += " " + line.strip()
            continue
        key, sep, value = line.partition(":")
        name = key.strip().lower()
        if not sep or not is_token(name):
            raise InvalidInput(f"part {part} has a malformed header line {line[:80]!r}")
        headers[name] = value.strip()
    return headers


# -- writing --------------------------------------------------------------------------------------


Part = tuple[Mapping[str, str], Iterable[bytes]]  # headers, body chunks (read lazily)


def new_boundary() -> str:
    """A fresh random boundary (32 hex digits: never found in a body by chance)."""
    return uuid.uuid4().hex


def stable_boundary(*identity: bytes | str) -> str:
    """A boundary that is the same for the same body (so byte ranges of one answer fit those of
    the next): a hash of what identifies the parts, as unlikely in a body as a random one."""
    digest = hashlib.blake2b(digest_size=16)
    for item in identity:
        digest.update(item.encode() if isinstance(item, str) else item)
        digest.update(b"\0")
    return digest.hexdigest()


def content_type(part_type: str, boundary: str, **params: str) -> str:
    """``multipart/related; type="<part_type>"; boundary=<boundary>`` plus extra parameters,
    always quoted (``transfer_syntax`` is written ``transfer-syntax``)."""
    extra = "".join(f'; {k.replace("_", "-")}="{v}"' for k, v in params.items())
    return format_media_type(RELATED, {"type": part_type, "boundary": boundary}) + extra


def part_head(boundary: str, headers: Mapping[str, str]) -> bytes:
    """The delimiter line and header block that open one part."""
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"--{boundary}\r\n{lines}\r\n".encode("latin-1")


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")


def iter_multipart(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    """A multipart body as chunks: each part's head, its body chunks, CRLF; then the close."""
    for headers, body in parts:
        yield part_head(boundary, headers)
        yield from body
        yield b"\r\n"
    yield closing(boundary)
