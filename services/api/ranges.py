"""HTTP range requests (RFC 9110 section 14) on a body whose bytes are known before it is sent.

A body is a list of segments, each bytes or a whole file read when sent, so a stored instance
is never held in memory; an entity tag names its exact bytes. One ``bytes=first-last``,
``bytes=first-`` or ``bytes=-suffix`` range is answered 206 with Content-Range; a range that
starts past the end 416 with ``Content-Range: bytes */<length>``; several ranges, a malformed
header, or an If-Range that is not the current ETag get the whole body, 200, as RFC 9110
allows. If-None-Match with the current ETag gets 304. Every answer says
``Accept-Ranges: bytes``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from services.api.problems import problem

Segment = bytes | Path
CHUNK_BYTES = 1 << 20


class Unsatisfiable(Exception):
    """The range starts at or past the end of the body."""


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def parse_range(header: str | None, length: int) -> tuple[int, int] | None:
    """The one range asked for as (first, end exclusive), or None to send the whole body."""
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    first_text, last_text = first_text.strip(), last_text.strip()
    if not dash or not (_digits(first_text) or (not first_text and _digits(last_text))):
        return None
    if last_text and not _digits(last_text):
        return None
    if not first_text:  # a suffix: the last N bytes
        suffix = int(last_text)
        if suffix == 0 or length == 0:
            raise Unsatisfiable
        return max(0, length - suffix), length
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None  # invalid: ignore it
    if first >= length:
        raise Unsatisfiable
    end = min(length, int(last_text) + 1) if last_text else length
    return first, end


def _size(segment: Segment) -> int:
    return len(segment) if isinstance(segment, bytes) else segment.stat().st_size


def iter_segments(segments: Sequence[Segment], first: int, end: int) -> Iterator[bytes]:
    """The bytes from ``first`` to ``end`` (exclusive) of the concatenated segments."""
    position = 0
    for segment in segments:
        size = _size(segment)
        lo, hi = max(first, position), min(end, position + size)
        offset = position
        position += size
        if lo >= hi:
            continue
        if isinstance(segment, bytes):
            yield segment[lo - offset : hi - offset]
            continue
        with segment.open("rb") as fh:
            fh.seek(lo - offset)
            left = hi - lo
            while left > 0 and (data := fh.read(min(CHUNK_BYTES, left))):
                left -= len(data)
                yield data


def _matches(header: str | None, tag: str) -> bool:
    """If-None-Match: ``*`` or any of its entity tags, compared weakly (RFC 9110 13.1.2)."""
    if header is None:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or tag in tags


def ranged_response(
    request: Request,
    segments: Sequence[Segment],
    media_type: str,
    etag: str,
) -> Response:
    """The body (200), the byte range the request asks for (206, or 416), or 304 when the
    client's copy (If-None-Match) is current; ``etag`` names these exact bytes."""
    tag = f'"{etag}"'
    out = {"Accept-Ranges": "bytes", "ETag": tag}
    if _matches(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers=out)
    length = sum(_size(s) for s in segments)
    if_range = request.headers.get("if-range")
    header = request.headers.get("range") if if_range in (None, tag) else None
    try:
        wanted = parse_range(header, length)
    except Unsatisfiable:
        response = problem(
            416,
            "Range Not Satisfiable",
            f"the range {header!r} starts past the end of the {length}-byte body",
        )
        response.headers.update({**out, "Content-Range": f"bytes */{length}"})
        return response
    first, end = wanted if wanted is not None else (0, length)
    out["Content-Length"] = str(end - first)
    status = 200
    if wanted is not None:
        status = 206
        out["Content-Range"] = f"bytes {first}-{end - 1}/{length}"
    return StreamingResponse(
        iter_segments(segments, first, end), status_code=status, media_type=media_type, headers=out
    )
