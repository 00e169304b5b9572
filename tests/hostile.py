"""Hand-crafted hostile DICOM files (issue 16), each carrying known patient values.

``corpus()`` maps a name to the bytes of a Part 10 file that crgate must refuse with a reason;
``PATIENT`` holds the values no log line or error text may contain. Shared by the tests and
bench/bench_hostile.py.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
PATIENT = {
    "PatientName": "SECRETNAME^HOSTILE",
    "PatientID": "PIDSECRET4711",
    "PatientBirthDate": "19450317",
}
SECRETS = ("SECRETNAME", "HOSTILE", "PIDSECRET4711", "19450317")


def image(
    rows: int = 8,
    columns: int = 8,
    *,
    pixels: bytes | None = None,
    sop_class: str = CT,
    sop_uid: str | None = None,
    study_uid: str | None = None,
) -> Dataset:
    """A small 16-bit monochrome image with the known patient values."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.Modality = "CT"
    ds.PatientName = PATIENT["PatientName"]
    ds.PatientID = PATIENT["PatientID"]
    ds.PatientBirthDate = PATIENT["PatientBirthDate"]
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels if pixels is not None else bytes(rows * columns * 2)
    return ds


def part10(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """``ds`` as a Part 10 file whose meta says ``syntax``; the body is written in explicit VR
    little endian whatever ``syntax`` claims (deflated when it says deflate)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    head = DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    data = body.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        data = _deflate(data)
    return bytes(head.getvalue()) + bytes(data)


def _body_start(data: bytes) -> int:
    (group_length,) = struct.unpack("<I", data[140:144])
    return 144 + group_length


def _deflate(body: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(body) + compressor.flush()


def nul_in_patient_name() -> bytes:
    ds = image()
    ds.PatientName = "SECRETNAME\x00^HOSTILE"
    return part10(ds)


def sop_uid_swallows_patient() -> bytes:
    """The SOP Instance UID's length covers the patient elements that follow it."""
    ds = image()
    data = part10(ds)
    uid = str(ds.SOPInstanceUID).encode()
    uid += b"\x00" * (len(uid) % 2)
    header = b"\x08\x00\x18\x00UI" + struct.pack("<H", len(uid))
    at = data.index(header + uid, _body_start(data))
    name_at = data.index(b"\x10\x00\x10\x00PN", at)  # Patient Name
    date_at = data.index(b"\x10\x00\x30\x00DA", at)  # Patient's Birth Date
    end = date_at + 8 + 8  # through the birth date's value
    swallowed = end - (at + 8)
    assert name_at > at and swallowed < 0xFFFF
    return data[:at] + header[:6] + struct.pack("<H", swallowed) + data[at + 8 :]


def native_length_mismatch() -> bytes:
    return part10(image(16, 16, pixels=bytes(100)))


def huge_image_tiny_pixels() -> bytes:
    return part10(image(65535, 65535, pixels=bytes(64)))


def native_labelled(syntax: str) -> Callable[[], bytes]:
    def build() -> bytes:
        return part10(image(), syntax)

    return build


def unknown_transfer_syntax() -> bytes:
    return part10(image(), "1.2.3.4.5.6")


def unknown_vr_in(keyword_tag: bytes) -> Callable[[], bytes]:
    """An element (``keyword_tag``: its 4 tag bytes, little endian) given the VR ``ZZ``."""

    def build() -> bytes:
        data = part10(image())
        at = data.index(keyword_tag, _body_start(data))
        return data[: at + 4] + b"ZZ" + data[at + 6 :]

    return build


def deflate_bomb(inflated_bytes: int = 120 * 1024 * 1024) -> bytes:
    """A deflated instance of a few hundred KB that inflates to ``inflated_bytes``."""
    side = int((inflated_bytes // 2) ** 0.5)
    return part10(image(side, side, pixels=bytes(side * side * 2)), DeflatedExplicitVRLittleEndian)


def nested_sequences(depth: int = 3000) -> bytes:
    """A data set whose sequences (undefined length) nest ``depth`` levels deep."""
    data = part10(image())
    sequence, item = (
        b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff",
        b"\xfe\xff\x00\xe0\xff\xff\xff\xff",
    )
    item_end, sequence_end = (
        b"\xfe\xff\x0d\xe0\x00\x00\x00\x00",
        b"\xfe\xff\xdd\xe0\x00\x00\x00\x00",
    )
    nested = (sequence + item) * depth + (item_end + sequence_end) * depth
    at = data.index(b"\x10\x00\x10\x00PN", _body_start(data))  # before Patient Name
    return data[:at] + nested + data[at:]


BITS_ALLOCATED = b"\x28\x00\x00\x01"
SOP_INSTANCE_UID = b"\x08\x00\x18\x00"
COLUMNS = b"\x28\x00\x11\x00"


def corpus() -> dict[str, bytes]:
    """Every hostile file, by name: each must be refused, none may leak patient values."""
    builders: dict[str, Callable[[], bytes]] = {
        "nul-in-patient-name": nul_in_patient_name,
        "sop-uid-swallows-patient": sop_uid_swallows_patient,
        "native-length-mismatch": native_length_mismatch,
        "65535x65535-with-64-bytes": huge_image_tiny_pixels,
        "native-labelled-jpeg2000": native_labelled(JPEG2000),
        "native-labelled-jpeg": native_labelled(JPEGBaseline8Bit),
        "native-labelled-rle": native_labelled(RLELossless),
        "unknown-transfer-syntax": unknown_transfer_syntax,
        "unknown-vr-in-bits-allocated": unknown_vr_in(BITS_ALLOCATED),
        "unknown-vr-in-sop-instance-uid": unknown_vr_in(SOP_INSTANCE_UID),
        "deflate-bomb": deflate_bomb,
        "nested-sequences-3000": nested_sequences,
    }
    return {name: build() for name, build in builders.items()}
