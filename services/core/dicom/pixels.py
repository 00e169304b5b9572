"""Decoding a dataset's pixels into frames, and describing what crgate sees in a file.

Decoding is pydicom's, with the pylibjpeg plugins (OpenJPEG, libjpeg, RLE) installed: native
little and big endian, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000 and HTJ2K.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import UID

from services.core.codecs.image import PixelLayout
from services.core.dicom.values import as_strings
from services.core.errors import CodecError, NoPixelData, UnsupportedSyntax

_SUPPORTED_PHOTOMETRIC = {
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_ICT",
    "YBR_RCT",
}


@dataclass(frozen=True)
class ImagePixels:
    """Decoded stored values: ``frames`` is (frames, rows, cols) or (frames, rows, cols, 3)."""

    frames: npt.NDArray[Any]
    layout: PixelLayout
    photometric: str  # of the decoded values: MONOCHROME1/2 or RGB

    def frame_list(self) -> list[npt.NDArray[Any]]:
        return [self.frames[i] for i in range(self.layout.frames)]


def layout_of(ds: Dataset, source: str) -> PixelLayout:
    """Geometry and bit depth from the Image Pixel module; errors name ``source``."""
    if "PixelData" not in ds:
        kind = "float " if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds else ""
        raise NoPixelData(
            f"{source}: no {kind}Pixel Data (7FE0,0010): not an image crgate can code"
        )
    missing = [
        k
        for k in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PhotometricInterpretation")
        if k not in ds
    ]
    if missing:
        raise NoPixelData(f"{source}: image lacks required attribute(s) {', '.join(missing)}")
    bits_allocated = int(ds.BitsAllocated)
    bits_stored = int(ds.BitsStored)
    if bits_allocated not in (8, 16) or not 1 <= bits_stored <= bits_allocated:
        raise CodecError(
            f"{source}: Bits Allocated {bits_allocated} / Bits Stored {bits_stored} not supported "
            "(crgate codes 8 or 16 bits allocated, up to 16 bits stored)"
        )
    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric not in _SUPPORTED_PHOTOMETRIC:
        raise CodecError(
            f"{source}: Photometric Interpretation {photometric} not supported "
            "(monochrome, RGB or YBR only)"
        )
    return PixelLayout(
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        samples=int(ds.get("SamplesPerPixel", 1)),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        signed=int(ds.get("PixelRepresentation", 0)) == 1,
    )


def load_pixels(ds: Dataset, source: str) -> ImagePixels:
    """Decode every frame of ``ds``; raise a CrgateError naming ``source`` and the reason."""
    layout = layout_of(ds, source)
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    try:
        array = ds.pixel_array
    except NotImplementedError as exc:
        raise UnsupportedSyntax(
            f"{source}: no installed decoder handles transfer syntax {syntax.name} ({syntax}): "
            f"{_one_line(exc)}"
        ) from None
    except Exception as exc:  # pydicom and the plugins raise many types on damaged data
        raise CodecError(
            f"{source}: cannot decode pixel data ({syntax.name}): {_one_line(exc)}"
        ) from None
    photometric = str(ds.PhotometricInterpretation).strip()
    if layout.samples == 3:
        photometric = "RGB"  # pydicom converts YBR to RGB when it decodes
    elif layout.samples != 1:
        raise CodecError(f"{source}: {layout.samples} samples per pixel not supported (1 or 3)")
    frames = array.reshape(
        (layout.frames, layout.rows, layout.columns)
        + ((layout.samples,) if layout.samples > 1 else ())
    )
    return ImagePixels(frames=np.ascontiguousarray(frames), layout=layout, photometric=photometric)


def _one_line(exc: BaseException) -> str:
    """The exception's text on one line (pydicom lists each plugin's failure on its own)."""
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")


def describe(ds: Dataset, source: str) -> dict[str, Any]:
    """What crgate sees in a dataset: identity, geometry, bits, syntax, lossy history.

    Carries UIDs and technical attributes only, never patient name, ID or birth date.
    """
    syntax = UID(ds.file_meta.get("TransferSyntaxUID", ""))
    info: dict[str, Any] = {
        "file": source,
        "sop_class": UID(ds.get("SOPClassUID", "")).name or None,
        "sop_instance_uid": ds.get("SOPInstanceUID"),
        "study_instance_uid": ds.get("StudyInstanceUID"),
        "series_instance_uid": ds.get("SeriesInstanceUID"),
        "modality": ds.get("Modality"),
        "body_part": ds.get("BodyPartExamined"),
        "transfer_syntax": f"{syntax.name} ({syntax})" if syntax else None,
        "lossy_compression": ds.get("LossyImageCompression"),
        "lossy_ratios": as_strings(ds.get("LossyImageCompressionRatio")) or None,
        "lossy_methods": as_strings(ds.get("LossyImageCompressionMethod")) or None,
        "image_type": as_strings(ds.get("ImageType")) or None,
    }
    try:
        layout = layout_of(ds, source)
    except (NoPixelData, CodecError) as exc:
        info["image"] = None
        info["problem"] = str(exc)
        return info
    info.update(
        rows=layout.rows,
        columns=layout.columns,
        frames=layout.frames,
        samples_per_pixel=layout.samples,
        bits_allocated=layout.bits_allocated,
        bits_stored=layout.bits_stored,
        signed=layout.signed,
        photometric=str(ds.PhotometricInterpretation).strip(),
        pixel_spacing=as_strings(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")) or None,
        uncompressed_bytes=layout.uncompressed_bytes,
    )
    return info
