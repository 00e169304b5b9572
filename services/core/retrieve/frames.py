"""Frames: parse a frame list, check it, cut or decode the frames, encode them as JPEG 2000."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from services.core.codecs import OutputSyntax
from services.core.dicom.mediatype import OCTET
from services.core.dicom.pixels import layout_of
from services.core.errors import (
    CodecError,
    CrgateError,
    InvalidParameter,
    NotFound,
    TooLarge,
    UnsupportedSyntax,
)
from services.core.params import parse_count
from services.core.retrieve.errors import InvalidQuery, NotAcceptable
from services.core.retrieve.lookup import StoredInstance, read_instance
from services.core.retrieve.negotiation import FRAME_OFFERS, FrameFormat

DEFAULT_MAX_FRAMES = 1000  # Settings.max_frames_per_request


def parse_frame_list(text: str, limit: int = DEFAULT_MAX_FRAMES) -> list[int]:
    """``"1,3"`` -> [1, 3] (1-based, repeats dropped, order kept); InvalidQuery on anything
    else, TooLarge above ``limit`` distinct frames (a response holds each frame once)."""
    numbers: dict[int, None] = {}
    for item in text.split(","):
        try:
            numbers[parse_count(item.strip(), "frame number", minimum=1)] = None
        except InvalidParameter:
            raise InvalidQuery(
                f"frame list {text[:80]!r}: use comma-separated frame numbers from 1, e.g. 1,2"
            ) from None
    if len(numbers) > limit:
        raise TooLarge(
            f"the frame list names {len(numbers)} frames; at most {limit} per request "
            "(CRGATE_MAX_FRAMES_PER_REQUEST)"
        )
    return list(numbers)


def check_frames(instance: StoredInstance, numbers: Sequence[int]) -> None:
    """NotFound unless the instance has pixels and every frame number (1-based) exists."""
    if not instance.is_image:
        raise NotFound(f"{instance.source} has no Pixel Data, so no frames")
    beyond = [n for n in numbers if n > instance.frames]
    if beyond:
        raise NotFound(
            f"frame {beyond[0]} does not exist: {instance.source} has "
            f"{instance.frames} frame{'s' if instance.frames != 1 else ''}"
        )


def extract_frames(
    instance: StoredInstance, numbers: Sequence[int], fmt: FrameFormat, *, threads: int = 0
) -> list[bytes]:
    """The requested frames (1-based) as ``fmt`` says: raw little endian, the stored
    codestreams (``fmt`` names the stored encapsulated syntax, or one that holds them as they
    are), or a lossless encode in the family of ``fmt``'s syntax (JPEG 2000 or HTJ2K)."""
    check_frames(instance, numbers)
    ds = read_instance(instance)
    stored = UID(ds.file_meta.TransferSyntaxUID)
    target = OutputSyntax.from_uid(fmt.transfer_syntax)
    reuse = stored.is_encapsulated and (
        stored == fmt.transfer_syntax or (target is not None and target.holds(stored))
    )
    if reuse:  # the stored codestream as it is: nothing decoded, whatever the codec
        frames = instance.frames
        return [get_frame(ds.PixelData, n - 1, number_of_frames=frames) for n in numbers]
    if fmt.media_type == OCTET or target is None:
        return [_native_frame(ds, n - 1, instance.source) for n in numbers]
    codec = target.lossless_sibling.codec
    layout = replace(layout_of(ds, instance.source), frames=1)
    out = []
    for n in numbers:
        frame = decode(ds, n - 1, instance.source)
        try:
            encoded = codec.encode([frame], layout, 1.0, threads=threads)
        except CodecError as exc:
            raise NotAcceptable(
                f"frame {n} of {instance.source} cannot be sent as {codec.title} ({exc})",
                FRAME_OFFERS[:1],
            ) from None
        out.append(encoded.frames[0])
    return out


def _native_frame(ds: Dataset, index: int, source: str) -> bytes:
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    bits = int(ds.BitsAllocated)
    if not syntax.is_compressed and syntax.is_little_endian and bits % 8 == 0:
        size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
        data: bytes = ds.PixelData[index * size : (index + 1) * size]
        return data
    return little_endian_bytes(decode(ds, index, source))


def little_endian_bytes(array: npt.NDArray[Any]) -> bytes:
    """Decoded pixels as uncompressed little endian bytes."""
    return np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()


def decode(ds: Dataset, index: int | None, source: str) -> npt.NDArray[Any]:
    """One frame (or all, ``index`` None) decoded; colour comes back RGB."""
    with decoder_errors(source, UID(ds.file_meta.TransferSyntaxUID)):
        return pixel_array(ds, index=index)


@contextmanager
def decoder_errors(
    source: str, syntax: UID, no_decoder: Callable[[str], CrgateError] = UnsupportedSyntax
) -> Iterator[None]:
    """Decoding failures as crgate errors: ``no_decoder(message)`` when no installed decoder
    handles ``syntax``, CodecError for anything else (pydicom and the plugins raise many types
    on damaged data)."""
    try:
        yield
    except NotImplementedError as exc:
        raise no_decoder(f"{source}: no installed decoder handles {syntax.name} ({exc})") from None
    except Exception as exc:
        raise CodecError(f"{source}: cannot decode pixel data ({syntax.name}): {exc}") from None
