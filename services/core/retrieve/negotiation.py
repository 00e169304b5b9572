"""Accept negotiation: which media type and transfer syntax to send (PS3.18 8.7)."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
)

from services.core.codecs import OutputSyntax
from services.core.dicom.mediatype import (
    DICOM,
    DICOM_JSON,
    JHC,
    JP2,
    JPEG,
    JPHC,
    OCTET,
    PNG,
    is_media_type,
    parse_media_type,
    split_list,
)
from services.core.errors import InvalidInput
from services.core.retrieve.errors import NotAcceptable

AS_STORED = "*"
J2K_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000})
TRANSCODABLE = (ExplicitVRLittleEndian, *(s.uid for s in OutputSyntax))
"""Whole instances can be sent in these (pixels coded reversibly); any other only as stored."""


@dataclass(frozen=True)
class MediaRange:
    """One media range of an Accept header."""

    media_type: str  # lower case, e.g. multipart/related, */*
    params: dict[str, str]  # lower-case names; type is lower-cased, quotes removed
    q: float


def parse_accept(header: str | None, offered: Sequence[str]) -> list[MediaRange]:
    """Media ranges by preference (q descending, then order); q=0 ranges dropped.

    An unparsable header raises NotAcceptable listing ``offered``.
    """
    if header is None or not header.strip():
        return []
    ranges: list[MediaRange] = []
    for raw in split_list(header):
        try:
            media, params = parse_media_type(raw)
        except InvalidInput as exc:
            raise NotAcceptable(f"unparsable Accept header: {exc}", offered) from None
        if not is_media_type(media):
            raise NotAcceptable(f"unparsable Accept header: bad media range {media!r}", offered)
        if "type" in params:
            params["type"] = params["type"].lower()
        q = 1.0
        if "q" in params:
            try:
                q = float(params.pop("q"))
            except ValueError:
                q = math.nan
            if not 0 <= q <= 1:
                raise NotAcceptable("unparsable Accept header: q must be 0..1", offered)
        if q > 0:
            ranges.append(MediaRange(media, params, q))
    return sorted(ranges, key=lambda r: -r.q)  # stable: equal q keeps the client's order


def _part_type(r: MediaRange, default: str) -> str | None:
    """The part media type a range asks for, or None when it is not a multipart request."""
    if r.media_type == "multipart/related":
        return r.params.get("type", default)
    if r.media_type in ("*/*", "multipart/*"):
        return "*/*"
    return None


def multipart_offer(part: str, syntax: str) -> str:
    """An offer as a 406 problem lists it: ``multipart/related; type=...; transfer-syntax=...``."""
    return f'multipart/related; type="{part}"; transfer-syntax={syntax}'


def offered_for_instances(stored: Collection[str]) -> list[str]:
    """What whole instances stored in ``stored`` syntaxes can be sent as."""
    syntaxes = [AS_STORED, *TRANSCODABLE, *sorted(set(stored) - set(TRANSCODABLE))]
    return [multipart_offer(DICOM, s) for s in syntaxes]


def negotiate_instances(accept: str | None, stored: Collection[str]) -> str:
    """The transfer syntax to send instances in: a UID, or AS_STORED.

    No Accept (or no transfer-syntax parameter) means Explicit VR Little Endian (PS3.18).
    """
    offered = offered_for_instances(stored)
    ranges = parse_accept(accept, offered)
    if not ranges:
        return ExplicitVRLittleEndian
    for r in ranges:
        part = _part_type(r, DICOM)
        if part not in (DICOM, "*/*"):
            continue
        syntax = r.params.get("transfer-syntax")
        if syntax is None:
            return ExplicitVRLittleEndian
        if syntax == AS_STORED or syntax in TRANSCODABLE:
            return syntax
        if stored and all(s == syntax for s in stored):
            return syntax
    raise NotAcceptable(f"cannot send these instances as {accept!r}", offered)


@dataclass(frozen=True)
class FrameFormat:
    """How frames (and Pixel Data as bulk data) are sent."""

    media_type: str  # OCTET, or a codestream type (image/jp2, image/jphc, image/jhc)
    transfer_syntax: str  # a compressed one: the stored fragments as they are (or J2K made)
    single_part: bool = False  # the client asked for the bare frame, not multipart/related

    @property
    def content_type(self) -> str:
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax}"


FRAME_OFFERS = [
    multipart_offer(OCTET, ExplicitVRLittleEndian),
    multipart_offer(JP2, JPEG2000Lossless),
    multipart_offer(JP2, JPEG2000),
    multipart_offer(JPHC, HTJ2KLossless),
    multipart_offer(JPHC, HTJ2KLosslessRPCL),
    multipart_offer(JPHC, HTJ2K),
    multipart_offer(OCTET, AS_STORED),
]
CODESTREAM_SYNTAXES = {
    JP2: (JPEG2000Lossless, JPEG2000),
    JPHC: (HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K),
    JHC: (HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K),
}
"""Frame media types that carry codestreams, and their syntaxes (the first is the default)."""
_SINGLE_PART = (OCTET, *CODESTREAM_SYNTAXES)


def _family(syntax: str | None) -> str | None:
    """The codestream media type of a syntax (image/jp2 or image/jphc), if it has one."""
    return next((m for m, family in CODESTREAM_SYNTAXES.items() if syntax in family), None)


def negotiate_frames(accept: str | None, stored: str) -> FrameFormat:
    """Uncompressed by default; the stored codestream for ``transfer-syntax=*`` or the stored
    syntax named; JPEG 2000 for image/jp2 and HTJ2K for image/jphc (or image/jhc), as stored
    when it is of that family, else a lossless encode. A bare ``application/octet-stream``,
    ``image/jp2`` or ``image/jphc`` (no multipart) asks for a single part."""
    known = bool(stored) and UID(stored).is_transfer_syntax  # a stored file may predate checks
    encapsulated = known and UID(stored).is_encapsulated
    for r in parse_accept(accept, FRAME_OFFERS) or [MediaRange("*/*", {}, 1.0)]:
        single = r.media_type in _SINGLE_PART
        part = r.media_type if single else _part_type(r, OCTET)
        syntax = r.params.get("transfer-syntax")
        uncompressed = FrameFormat(OCTET, ExplicitVRLittleEndian, single)
        family = CODESTREAM_SYNTAXES.get(str(part), ())
        if encapsulated and syntax in (AS_STORED, stored):
            if part == OCTET or stored in family:
                return FrameFormat(str(part), stored, single)
            if part == "*/*":
                return FrameFormat(_family(stored) or OCTET, stored, single)
        if part in (OCTET, "*/*") and syntax in (None, AS_STORED, ExplicitVRLittleEndian):
            return uncompressed
        if family:
            if syntax is None:
                return FrameFormat(str(part), stored if stored in family else family[0], single)
            if syntax in family:
                return FrameFormat(str(part), str(syntax), single)
        if part in ("image/*", "*/*"):
            media = _family(syntax)
            if syntax is None and part == "image/*":
                return FrameFormat(JP2, stored if stored in J2K_SYNTAXES else JPEG2000Lossless)
            if media is not None:
                return FrameFormat(media, str(syntax), single)
    raise NotAcceptable(f"cannot send frames as {accept!r}", FRAME_OFFERS)


def negotiate_rendered(accept: str | None) -> str:
    """image/png (default) or image/jpeg."""
    offered = [PNG, JPEG]
    for r in parse_accept(accept, offered) or [MediaRange("*/*", {}, 1.0)]:
        if r.media_type in (PNG, JPEG):
            return r.media_type
        if r.media_type in ("image/*", "*/*"):
            return PNG
    raise NotAcceptable(f"cannot render as {accept!r}", offered)


def negotiate_metadata(accept: str | None, what: str = "metadata") -> None:
    """Nothing to choose: ``what`` is DICOM JSON; NotAcceptable when the client refuses it."""
    offered = [DICOM_JSON, "application/json"]
    ranges = parse_accept(accept, offered)
    wanted = {DICOM_JSON, "application/json", "application/*", "*/*"}
    if ranges and not any(r.media_type in wanted for r in ranges):
        raise NotAcceptable(f"{what} comes only as DICOM JSON, not {accept!r}", offered)
