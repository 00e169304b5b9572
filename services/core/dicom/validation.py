"""What a received data set must be before it is stored (issue 16's hostile files).

``read_part10`` reads a file's header without its pixel data: a deflated body is first inflated
in chunks to count its size (refused above ``max_inflated_bytes``, so a 100 KB "zip bomb" never
sits in memory whole), and a nesting too deep for the parser is refused, not a traceback.
``check_dataset`` then reads every element that is not deferred (an unknown VR is refused
naming its tag), bounds the sequence nesting depth, and checks that the transfer syntax is a
known one and that Pixel Data matches what the data set says about it: at least the native
bytes Rows x Columns x frames x samples x bits need (more is padding), encapsulated fragments
under a compressed syntax.
Errors name tags and sizes, never values (a value may be a patient's name).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from services.core.errors import InvalidInput, NotDicom, TooLarge, UnsupportedSyntax

DEFAULT_MAX_INFLATED_BYTES = 64 * 1024**2  # Settings.max_inflated_bytes
MAX_SEQUENCE_DEPTH = 32  # real objects nest a few levels; the parser recurses per level
PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
_INFLATE_CHUNK = 1 << 20
_READ_ERRORS = (
    EOFError,
    OSError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    NotImplementedError,
    IndexError,
    zlib.error,
    struct.error,
)


class NestedTooDeep(InvalidInput):
    """Sequences nested deeper than MAX_SEQUENCE_DEPTH."""


def read_part10(path: Path, *, max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> Dataset:
    """The data set of a Part 10 file, large values deferred; NotDicom when unreadable,
    TooLarge when a deflated body inflates beyond ``max_inflated_bytes``."""
    try:
        syntax = _meta_syntax(path)
        if syntax == DeflatedExplicitVRLittleEndian:
            _check_inflated_size(path, max_inflated_bytes)
        return pydicom.dcmread(path, defer_size=1024)
    except InvalidDicomError as exc:
        raise NotDicom(f"not a DICOM Part 10 file ({exc})") from None
    except RecursionError:
        raise NestedTooDeep(
            f"sequences nest too deeply to be read (more than {MAX_SEQUENCE_DEPTH} levels are "
            "refused)"
        ) from None
    except _READ_ERRORS as exc:
        raise NotDicom(f"unreadable or truncated DICOM file ({type(exc).__name__})") from None


def _meta_syntax(path: Path) -> str | None:
    meta = pydicom.filereader.read_file_meta_info(path)
    value = meta.get("TransferSyntaxUID")
    return str(value) if value else None


def _check_inflated_size(path: Path, limit: int) -> None:
    """TooLarge when the deflated body after the file meta inflates beyond ``limit`` bytes."""
    with path.open("rb") as fh:
        fh.seek(132)
        head = fh.read(12)
        if len(head) < 12 or head[4:6] != b"UL":
            raise NotDicom("deflated file without a file meta group length")
        (group_length,) = struct.unpack("<I", head[8:12])
        fh.seek(144 + group_length)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while chunk := fh.read(_INFLATE_CHUNK):
            while chunk:
                total += len(inflater.decompress(chunk, _INFLATE_CHUNK))
                if total > limit:
                    raise TooLarge(
                        f"the deflated data set inflates to more than {limit} bytes "
                        "(CRGATE_MAX_INFLATED_BYTES); send it uncompressed or in a JPEG syntax"
                    )
                chunk = inflater.unconsumed_tail
            if inflater.eof:
                break


def check_dataset(ds: Dataset, what: str) -> None:
    """Refuse (naming ``what``, the instance) a data set crgate could not serve back."""
    _check_elements(ds, what)
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    if not syntax.is_transfer_syntax:
        raise UnsupportedSyntax(
            f"{what}: transfer syntax {syntax} is not a DICOM transfer syntax crgate knows"
        )
    if PIXEL_DATA in ds._dict:
        _check_pixel_data(ds, syntax, what)


def _check_elements(ds: Dataset, what: str) -> None:
    """Every element that is in memory is read (deferred ones keep their bytes on disk)."""
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    while stack:
        current, depth = stack.pop()
        if depth > MAX_SEQUENCE_DEPTH:
            raise NestedTooDeep(
                f"{what}: sequences nest more than {MAX_SEQUENCE_DEPTH} levels deep"
            )
        for tag in list(current._dict):
            raw = current._dict[tag]
            if tag == PIXEL_DATA or (isinstance(raw, RawDataElement) and raw.value is None):
                continue
            try:
                element = current[tag]
                value: Any = element.value
            except Exception as exc:  # pydicom raises many types on a malformed element
                raise InvalidInput(
                    f"{what}: element {Tag(tag)} cannot be read ({type(exc).__name__}: unknown "
                    "VR or malformed value)"
                ) from None
            if element.VR == "SQ":
                stack.extend((item, depth + 1) for item in value)


def _pixel_attribute(ds: Dataset, keyword: str, what: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(
            f"{what} has Pixel Data but {keyword} is missing or not an integer"
        ) from None
    if number < 1:
        raise InvalidInput(f"{what}: {keyword} is {number}; it must be at least 1")
    return number


def _check_pixel_data(ds: Dataset, syntax: UID, what: str) -> None:
    raw = ds._dict[Tag(PIXEL_DATA)]
    length = raw.length if isinstance(raw, RawDataElement) else len(ds.PixelData)
    rows = _pixel_attribute(ds, "Rows", what)
    columns = _pixel_attribute(ds, "Columns", what)
    bits = _pixel_attribute(ds, "BitsAllocated", what)
    samples = _pixel_attribute(ds, "SamplesPerPixel", what, 1)
    frames = _pixel_attribute(ds, "NumberOfFrames", what, 1)
    if bits != 1 and bits % 8:
        raise InvalidInput(f"{what}: Bits Allocated is {bits}; use 1 or a multiple of 8")
    if syntax.is_encapsulated:
        if length != UNDEFINED_LENGTH:
            raise InvalidInput(
                f"{what}: its transfer syntax {syntax.name} needs encapsulated (fragmented) "
                f"Pixel Data, but the file holds {length} native bytes"
            )
        return
    if length == UNDEFINED_LENGTH:
        raise InvalidInput(
            f"{what}: Pixel Data is encapsulated but the transfer syntax {syntax.name} is native"
        )
    values = rows * columns * frames * samples
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        values = values * 2 // 3  # two chroma samples shared by each pair of pixels
    expected = (values * bits + 7) // 8
    if length < expected:  # more is padding (real files have it); less cannot be decoded
        raise InvalidInput(
            f"{what}: Pixel Data holds {length} bytes but {rows} rows x {columns} columns x "
            f"{frames} frame(s) x {samples} sample(s) x {bits} bits need {expected}"
        )
