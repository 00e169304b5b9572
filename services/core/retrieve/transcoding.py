"""Whole instances in another transfer syntax, as Part 10 bytes (pixels always coded
reversibly: JPEG 2000 or HTJ2K lossless codestreams, under a lossless or lossy syntax)."""

from __future__ import annotations

import io

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from services.core.codecs import OutputSyntax
from services.core.dicom.derive import build_output
from services.core.dicom.mediatype import DICOM
from services.core.dicom.pixels import load_pixels
from services.core.errors import CodecError
from services.core.retrieve.errors import NotAcceptable
from services.core.retrieve.frames import decode, decoder_errors, little_endian_bytes
from services.core.retrieve.lookup import StoredInstance, read_instance
from services.core.retrieve.negotiation import (
    AS_STORED,
    multipart_offer,
    offered_for_instances,
)


def encode_instance(instance: StoredInstance, target: str, *, threads: int = 0) -> bytes | None:
    """The instance as a Part 10 file in ``target``; None when the stored file serves as is."""
    if target in (AS_STORED, instance.transfer_syntax_uid):
        return None
    ds = read_instance(instance)
    out = transcode(ds, target, threads=threads, source=instance.source)
    return dataset_bytes(out)


def dataset_bytes(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file in its file meta's transfer syntax."""
    buffer = io.BytesIO()
    # dcmwrite, not save_as: save_as refuses to turn a (retired) big endian file little endian
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def transcode(ds: Dataset, target: str, *, threads: int = 0, source: str = "<dataset>") -> Dataset:
    """``ds`` in ``target`` (one of TRANSCODABLE). Pixels are always coded reversibly: a
    lossy target syntax (JPEG 2000, HTJ2K) carries a lossless codestream of its family."""
    stored = UID(ds.file_meta.TransferSyntaxUID)
    if target == stored:
        return ds
    if target == ExplicitVRLittleEndian:
        return _to_explicit_le(ds, stored, source)
    syntax = OutputSyntax.from_uid(target)
    if syntax is None:
        raise NotAcceptable(
            f"{source}: crgate does not write {UID(target).name or target}",
            offered_for_instances([stored]),
        )
    if "PixelData" not in ds or syntax.holds(stored):
        # no pixels: the compressed syntaxes encode everything else as explicit VR little
        # endian; stored codestreams this syntax holds as they are stay as they are
        ds.file_meta.TransferSyntaxUID = UID(target)
        return ds
    lossless = syntax.lossless_sibling
    try:
        pixels = load_pixels(ds, source)
        encoded = lossless.codec.encode(pixels.frame_list(), pixels.layout, 1.0, threads=threads)
    except CodecError as exc:
        raise NotAcceptable(
            f"{source} cannot be sent as {syntax.codec.title} ({exc})",
            [multipart_offer(DICOM, s) for s in (AS_STORED, ExplicitVRLittleEndian)],
        ) from None
    out = build_output(ds, encoded, lossless, pixels.photometric)
    out.file_meta.TransferSyntaxUID = UID(target)
    return out


def _to_explicit_le(ds: Dataset, stored: UID, source: str) -> Dataset:
    if "PixelData" in ds and stored.is_compressed:
        # no decoder: the client may still take the instance as stored
        with decoder_errors(
            source,
            stored,
            lambda message: NotAcceptable(message, [multipart_offer(DICOM, AS_STORED)]),
        ):
            ds.decompress(generate_instance_uid=False)
        return ds
    if "PixelData" in ds and not stored.is_little_endian:
        ds.PixelData = little_endian_bytes(decode(ds, None, source))
        ds["PixelData"].VR = "OW" if int(ds.BitsAllocated) > 8 else "OB"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds
