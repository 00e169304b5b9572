"""Bulk data: Pixel Data as one part or a codestream per frame, other binary values as stored."""

from __future__ import annotations

from pydicom.uid import UID

from services.core.errors import NotFound
from services.core.retrieve.errors import InvalidQuery
from services.core.retrieve.frames import extract_frames
from services.core.retrieve.lookup import StoredInstance, read_instance
from services.core.retrieve.negotiation import FrameFormat


def pixel_data_bytes(
    instance: StoredInstance, fmt: FrameFormat, *, threads: int = 0
) -> list[bytes]:
    """Pixel Data as bulk data: one uncompressed part, or one codestream per frame."""
    numbers = list(range(1, instance.frames + 1))
    parts = extract_frames(instance, numbers, fmt, threads=threads)
    return parts if UID(fmt.transfer_syntax).is_encapsulated else [b"".join(parts)]


def bulk_value(instance: StoredInstance, tag: str) -> bytes:
    """The value of a top-level binary element other than Pixel Data."""
    try:
        number = int(tag, 16)
    except ValueError:
        raise InvalidQuery(f"bulk data tag {tag!r}: use 8 hex digits, e.g. 7FE00010") from None
    if len(tag) != 8:
        raise InvalidQuery(f"bulk data tag {tag!r}: use 8 hex digits, e.g. 7FE00010")
    ds = read_instance(instance)
    element = ds.get(number)
    if element is None or not isinstance(element.value, bytes):
        raise NotFound(f"{instance.source} has no top-level bulk data element {tag.upper()}")
    return element.value
