"""Whether two Part 10 files hold the same data set, whatever transfer syntax each is in.

A re-send is often the same instance in another encoding: implicit VR after explicit VR, a
PACS that decompressed it, STOW-RS after C-STORE. Two files hold the same data set when every
element outside the file meta group has the same value (compared as implicit VR little endian
bytes, so VR and length encodings do not matter) and their decoded pixels are identical. When
either file is compressed, Photometric Interpretation and Planar Configuration are left out of
the comparison: decoders legitimately change them (YBR_FULL_422 JPEG decodes to RGB).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

log = logging.getLogger(__name__)

_PIXELS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float and Double Float Pixel Data
_PIXEL_ENCODING = {0x00280004, 0x00280006}  # Photometric Interpretation, Planar Configuration
_PADDING = 0xFFFCFFFC  # Data Set Trailing Padding


def same_data_set(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` hold the same data set (False when either cannot be decoded)."""
    try:
        first, second = pydicom.dcmread(a), pydicom.dcmread(b)
        compressed = _compressed(first) or _compressed(second)
        if _others(first, compressed) != _others(second, compressed):
            return False
        return _same_pixels(first, second)
    except Exception as exc:  # an undecodable file is not proven to be the same
        log.debug("cannot compare decoded data sets: %s: %s", type(exc).__name__, exc)
        return False


def _compressed(ds: Dataset) -> bool:
    return bool(UID(ds.file_meta.TransferSyntaxUID).is_compressed)


def _others(ds: Dataset, compressed: bool) -> bytes:
    """Every element but pixels (and their encoding when compressed), as implicit VR LE bytes."""
    skip = _PIXELS | {_PADDING} | (_PIXEL_ENCODING if compressed else set())
    rest = Dataset()
    for element in ds:
        if element.tag not in skip and element.tag.group != 0x0002:
            rest.add(element)
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = True
    write_dataset(buffer, rest)
    return buffer.getvalue()


def _same_pixels(first: Dataset, second: Dataset) -> bool:
    have = [any(t in ds for t in _PIXELS) for ds in (first, second)]
    if not any(have):
        return True
    if not all(have):
        return False
    if not _compressed(first) and not _compressed(second) and "PixelData" in first:
        native = [
            UID(ds.file_meta.TransferSyntaxUID).is_little_endian and "PixelData" in ds
            for ds in (first, second)
        ]
        if all(native) and first.PixelData == second.PixelData:  # equal bytes, equal pixels
            return True
    return bool(np.array_equal(first.pixel_array, second.pixel_array))
