"""Retrieving stored instances (the core of WADO-RS, PS3.18 10.4): find them, negotiate what the
client accepts, transcode, cut frames, render images.

Transfer syntaxes offered for whole instances: as stored (``transfer-syntax=*``), Explicit VR
Little Endian (the default: compressed instances are decompressed), JPEG 2000 lossless (4.90)
and JPEG 2000 (4.91), or any syntax every requested instance is already stored in. JPEG 2000 is
made with crgate's own OpenJPEG codec, always reversibly: a 4.91 request with no compression
ratio gets a reversible (lossless) codestream labelled 4.91, which that syntax allows, so a
retrieve never silently discards information. Lossy output is the transcode pipeline's job.

Frames go out as ``application/octet-stream`` (uncompressed, little endian) or ``image/jp2``
(a JPEG 2000 codestream: the stored fragments when the instance is stored as JPEG 2000).
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import JPEG2000, UID, ExplicitVRLittleEndian, JPEG2000Lossless
from sqlalchemy.orm import Session, sessionmaker

from services.core.codecs import OutputSyntax
from services.core.codecs.jpeg2000 import encode_image
from services.core.db import repository
from services.core.db.tables import Instance
from services.core.dicom.derive import build_output
from services.core.dicom.io import read_dataset
from services.core.dicom.pixels import layout_of, load_pixels
from services.core.dicom.uids import validate_uid
from services.core.errors import (
    CodecError,
    InvalidInput,
    NotFound,
    UnsupportedSyntax,
)
from services.core.storage import InstanceStore

log = logging.getLogger(__name__)

AS_STORED = "*"
DICOM = "application/dicom"
OCTET = "application/octet-stream"
JP2 = "image/jp2"
PNG = "image/png"
JPEG = "image/jpeg"
DICOM_JSON = "application/dicom+json"
J2K_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000})
TRANSCODABLE = (ExplicitVRLittleEndian, JPEG2000Lossless, JPEG2000)
THUMBNAIL_SIZE = 128  # pixels: the box a thumbnail fits in when no viewport is given
MAX_VIEWPORT = 8192
DEFAULT_JPEG_QUALITY = 90
CHUNK_BYTES = 1 << 20


class NotAcceptable(UnsupportedSyntax):
    """Nothing the client accepts can be produced; ``offered`` lists what can."""

    def __init__(self, message: str, offered: Sequence[str]) -> None:
        super().__init__(f"{message}; offered: {', '.join(offered)}")
        self.offered = list(offered)


class InvalidQuery(InvalidInput):
    """A malformed frame list, window, viewport, quality or bulk data tag (HTTP 400)."""


# -- finding instances -------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredInstance:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    frames: int
    is_image: bool

    @property
    def source(self) -> str:
        return f"instance {self.sop_instance_uid}"


def find_instances(
    sessions: sessionmaker[Session],
    store: InstanceStore,
    *,
    study: str,
    series: str | None = None,
    sop: str | None = None,
) -> list[StoredInstance]:
    """The stored instances of a study, series or one instance; NotFound when there are none.

    Every file is checked to exist: a missing one is logged as an error and raises NotFound.
    """
    validate_uid(study, "Study Instance UID")
    if series is not None:
        validate_uid(series, "Series Instance UID")
    if sop is not None:
        validate_uid(sop, "SOP Instance UID")
    with sessions() as session:
        if sop is not None:
            row = repository.get_instance(session, sop_instance_uid=sop)
            rows = [row] if row and row.study_uid == study and row.series_uid == series else []
        else:
            rows = repository.instances_in(session, study_uid=study, series_uid=series)
    if not rows:
        if sop is not None:
            raise NotFound(f"instance {sop} of series {series} in study {study} is not stored here")
        if series is not None:
            raise NotFound(f"series {series} of study {study} is not stored here")
        raise NotFound(f"study {study} is not stored here")
    found = [_stored(store, row) for row in rows]
    for instance in found:
        if not instance.path.is_file():
            log.error(
                "file of instance sop=%s series=%s study=%s is missing: %s",
                instance.sop_instance_uid,
                instance.series_uid,
                instance.study_uid,
                instance.path,
            )
            raise NotFound(
                f"instance {instance.sop_instance_uid} is indexed but its file is missing from "
                "the store; the operator has been told (see the server log)"
            )
    return found


def _stored(store: InstanceStore, row: Instance) -> StoredInstance:
    return StoredInstance(
        study_uid=row.study_uid,
        series_uid=row.series_uid,
        sop_instance_uid=row.sop_instance_uid,
        transfer_syntax_uid=row.transfer_syntax_uid,
        path=store.absolute(row.path),
        frames=row.number_of_frames or 1,
        is_image=row.rows is not None,
    )


def read_instance(instance: StoredInstance) -> Dataset:
    """The whole dataset; NotFound (logged) when the file vanished since it was looked up."""
    if not instance.path.is_file():
        log.error(
            "file of instance sop=%s is missing: %s", instance.sop_instance_uid, instance.path
        )
        raise NotFound(
            f"the file of instance {instance.sop_instance_uid} is missing from the store"
        )
    return read_dataset(instance.path)


def iter_file(path: Path, chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
    """A stored file in chunks, so a study is never held in memory whole."""
    with path.open("rb") as fh:
        while data := fh.read(chunk):
            yield data


# -- Accept negotiation ------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaRange:
    media_type: str  # lower case, e.g. multipart/related, */*
    params: dict[str, str]  # lower-case names; type is lower-cased, quotes removed
    q: float


_TOKEN = re.compile(r"^[A-Za-z0-9!#$&^_.+*-]+/[A-Za-z0-9!#$&^_.+*-]+$")


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_accept(header: str | None, offered: Sequence[str]) -> list[MediaRange]:
    """Media ranges by preference (q descending, then order); q=0 ranges dropped.

    An unparsable header raises NotAcceptable listing ``offered``.
    """
    if header is None or not header.strip():
        return []
    ranges: list[MediaRange] = []
    for raw in _split(header, ","):
        if not raw.strip():
            continue
        media, *param_texts = (p.strip() for p in _split(raw, ";"))
        if not _TOKEN.match(media):
            raise NotAcceptable(f"unparsable Accept header: bad media range {media!r}", offered)
        params: dict[str, str] = {}
        for text in param_texts:
            name, eq, value = text.partition("=")
            if not eq or not name.strip():
                raise NotAcceptable(f"unparsable Accept header: bad parameter {text!r}", offered)
            params[name.strip().lower()] = value.strip().strip('"')
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
            ranges.append(MediaRange(media.lower(), params, q))
    return sorted(ranges, key=lambda r: -r.q)  # stable: equal q keeps the client's order


def _part_type(r: MediaRange, default: str) -> str | None:
    """The part media type a range asks for, or None when it is not a multipart request."""
    if r.media_type == "multipart/related":
        return r.params.get("type", default)
    if r.media_type in ("*/*", "multipart/*"):
        return "*/*"
    return None


def _multipart(part: str, syntax: str) -> str:
    return f'multipart/related; type="{part}"; transfer-syntax={syntax}'


def offered_for_instances(stored: Collection[str]) -> list[str]:
    syntaxes = [AS_STORED, *TRANSCODABLE, *sorted(set(stored) - set(TRANSCODABLE))]
    return [_multipart(DICOM, s) for s in syntaxes]


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
    media_type: str  # OCTET or JP2
    transfer_syntax: str

    @property
    def content_type(self) -> str:
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax}"


FRAME_OFFERS = [
    _multipart(OCTET, ExplicitVRLittleEndian),
    _multipart(JP2, JPEG2000Lossless),
    _multipart(JP2, JPEG2000),
]


def negotiate_frames(accept: str | None, stored: str) -> FrameFormat:
    """Uncompressed by default; JPEG 2000 (as stored when it is) for image/jp2 or a J2K syntax."""
    uncompressed = FrameFormat(OCTET, ExplicitVRLittleEndian)
    stored_j2k = stored if stored in J2K_SYNTAXES else None
    for r in parse_accept(accept, FRAME_OFFERS) or [MediaRange("*/*", {}, 1.0)]:
        part = _part_type(r, OCTET)
        syntax = r.params.get("transfer-syntax")
        if part == OCTET and syntax in (None, AS_STORED, ExplicitVRLittleEndian):
            return uncompressed
        if part in (JP2, "image/*"):
            if syntax is None:
                return FrameFormat(JP2, stored_j2k or JPEG2000Lossless)
            if syntax == AS_STORED and stored_j2k:
                return FrameFormat(JP2, stored_j2k)
            if syntax in J2K_SYNTAXES:
                return FrameFormat(JP2, syntax)
        if part == "*/*":
            if syntax in (None, ExplicitVRLittleEndian):
                return uncompressed
            if syntax == AS_STORED:
                return FrameFormat(JP2, stored_j2k) if stored_j2k else uncompressed
            if syntax in J2K_SYNTAXES:
                return FrameFormat(JP2, syntax)
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


def negotiate_metadata(accept: str | None) -> None:
    offered = [DICOM_JSON, "application/json"]
    ranges = parse_accept(accept, offered)
    wanted = {DICOM_JSON, "application/json", "application/*", "*/*"}
    if ranges and not any(r.media_type in wanted for r in ranges):
        raise NotAcceptable(f"metadata comes only as DICOM JSON, not {accept!r}", offered)


# -- transcoding whole instances ---------------------------------------------------------------


def encode_instance(instance: StoredInstance, target: str, *, threads: int = 0) -> bytes | None:
    """The instance as a Part 10 file in ``target``; None when the stored file serves as is."""
    if target in (AS_STORED, instance.transfer_syntax_uid):
        return None
    ds = read_instance(instance)
    out = transcode(ds, target, threads=threads, source=instance.source)
    return dataset_bytes(out)


def dataset_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    # dcmwrite, not save_as: save_as refuses to turn a (retired) big endian file little endian
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def transcode(ds: Dataset, target: str, *, threads: int = 0, source: str = "<dataset>") -> Dataset:
    """``ds`` in ``target`` (one of TRANSCODABLE); JPEG 2000 output is always reversible."""
    stored = UID(ds.file_meta.TransferSyntaxUID)
    if target == stored:
        return ds
    if target == ExplicitVRLittleEndian:
        return _to_explicit_le(ds, stored, source)
    if target not in J2K_SYNTAXES:
        raise NotAcceptable(
            f"{source}: crgate does not write {UID(target).name or target}",
            offered_for_instances([stored]),
        )
    if "PixelData" not in ds or (stored == JPEG2000Lossless and target == JPEG2000):
        # no pixels: the JPEG 2000 syntaxes encode everything else as explicit VR little endian;
        # a reversible codestream is valid in the 4.91 syntax as it stands
        ds.file_meta.TransferSyntaxUID = UID(target)
        return ds
    try:
        pixels = load_pixels(ds, source)
        encoded = encode_image(
            pixels.frame_list(), pixels.layout, 1.0, lossless=True, threads=threads
        )
    except CodecError as exc:
        raise NotAcceptable(
            f"{source} cannot be sent as JPEG 2000 ({exc})",
            [_multipart(DICOM, s) for s in (AS_STORED, ExplicitVRLittleEndian)],
        ) from None
    out = build_output(ds, encoded, OutputSyntax.J2K_LOSSLESS, pixels.photometric)
    out.file_meta.TransferSyntaxUID = UID(target)
    return out


def _to_explicit_le(ds: Dataset, stored: UID, source: str) -> Dataset:
    if "PixelData" in ds and stored.is_compressed:
        try:
            ds.decompress(generate_instance_uid=False)
        except NotImplementedError as exc:
            raise NotAcceptable(
                f"{source}: no installed decoder handles {stored.name} ({exc})",
                [_multipart(DICOM, AS_STORED)],
            ) from None
        except Exception as exc:  # pydicom and the plugins raise many types on damaged data
            raise CodecError(f"{source}: cannot decode pixel data ({stored.name}): {exc}") from None
        return ds
    if "PixelData" in ds and not stored.is_little_endian:
        array = _decode(ds, None, source)
        ds.PixelData = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
        ds["PixelData"].VR = "OW" if int(ds.BitsAllocated) > 8 else "OB"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


# -- frames ------------------------------------------------------------------------------------


def parse_frame_list(text: str) -> list[int]:
    """``"1,3"`` -> [1, 3] (1-based); InvalidQuery on anything else."""
    numbers = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise InvalidQuery(
                f"frame list {text!r}: use comma-separated frame numbers from 1, e.g. 1,2"
            )
        numbers.append(int(item))
    return numbers


def check_frames(instance: StoredInstance, numbers: Sequence[int]) -> None:
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
    """The requested frames (1-based) as ``fmt`` says: raw little endian or J2K codestreams."""
    check_frames(instance, numbers)
    ds = read_instance(instance)
    if fmt.media_type == OCTET:
        return [_native_frame(ds, n - 1, instance.source) for n in numbers]
    stored = UID(ds.file_meta.TransferSyntaxUID)
    reuse = stored == fmt.transfer_syntax or (
        stored == JPEG2000Lossless and fmt.transfer_syntax == JPEG2000
    )
    if reuse:
        frames = instance.frames
        return [get_frame(ds.PixelData, n - 1, number_of_frames=frames) for n in numbers]
    layout = replace(layout_of(ds, instance.source), frames=1)
    out = []
    for n in numbers:
        frame = _decode(ds, n - 1, instance.source)
        try:
            encoded = encode_image([frame], layout, 1.0, lossless=True, threads=threads)
        except CodecError as exc:
            raise NotAcceptable(
                f"frame {n} of {instance.source} cannot be sent as JPEG 2000 ({exc})",
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
    array = _decode(ds, index, source)
    return np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()


def _decode(ds: Dataset, index: int | None, source: str) -> npt.NDArray[Any]:
    """One frame (or all, ``index`` None) decoded; colour comes back RGB."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    try:
        return pixel_array(ds, index=index)
    except NotImplementedError as exc:
        raise UnsupportedSyntax(
            f"{source}: no installed decoder handles {syntax.name} ({exc})"
        ) from None
    except Exception as exc:  # pydicom and the plugins raise many types on damaged data
        raise CodecError(f"{source}: cannot decode pixel data ({syntax.name}): {exc}") from None


def pixel_data_bytes(
    instance: StoredInstance, fmt: FrameFormat, *, threads: int = 0
) -> list[bytes]:
    """Pixel Data as bulk data: one uncompressed part, or one J2K codestream per frame."""
    numbers = list(range(1, instance.frames + 1))
    parts = extract_frames(instance, numbers, fmt, threads=threads)
    return [b"".join(parts)] if fmt.media_type == OCTET else parts


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


# -- metadata ----------------------------------------------------------------------------------


def metadata_dataset(instance: StoredInstance) -> tuple[Dataset, str | None]:
    """The dataset without its Pixel Data value (never read), and Pixel Data's VR if present."""
    if not instance.path.is_file():
        log.error(
            "file of instance sop=%s is missing: %s", instance.sop_instance_uid, instance.path
        )
        raise NotFound(
            f"the file of instance {instance.sop_instance_uid} is missing from the store"
        )
    try:
        ds = pydicom.dcmread(instance.path, defer_size=1024)
    except Exception as exc:
        raise CodecError(f"{instance.source}: stored file unreadable ({exc})") from None
    pixel_vr = None
    raw = ds.get_item(0x7FE00010)
    if raw is not None:
        pixel_vr = str(raw.VR)
        del ds[0x7FE00010]
    ds.AvailableTransferSyntaxUID = instance.transfer_syntax_uid
    return ds, pixel_vr


# -- rendering ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "linear"  # linear | linear-exact | sigmoid (PS3.3 C.11.2.1.2)


@dataclass(frozen=True)
class RenderParams:
    media_type: str = PNG
    window: Window | None = None
    viewport: tuple[int, int] | None = None  # fit the output inside (width, height)
    region: tuple[int, int, int, int] | None = None  # source crop: x, y, width, height
    quality: int = DEFAULT_JPEG_QUALITY


_FUNCTIONS = {"linear": "linear", "linear-exact": "linear-exact", "linear_exact": "linear-exact",
              "sigmoid": "sigmoid"}  # fmt: skip


def parse_render_params(
    media_type: str,
    *,
    window: str | None = None,
    viewport: str | None = None,
    quality: str | None = None,
    thumbnail: bool = False,
) -> RenderParams:
    """PS3.18 8.3.5 query parameters; InvalidQuery (400) saying what is wrong."""
    params = RenderParams(media_type=media_type)
    if window is not None:
        params = replace(params, window=_parse_window(window))
    if viewport is not None:
        size, region = _parse_viewport(viewport)
        params = replace(params, viewport=size, region=region)
    elif thumbnail:
        params = replace(params, viewport=(THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    if quality is not None:
        try:
            value = int(quality)
        except ValueError:
            value = 0
        if not 1 <= value <= 100:
            raise InvalidQuery(f"quality={quality!r}: use an integer from 1 to 100")
        params = replace(params, quality=value)
    return params


def _parse_window(text: str) -> Window:
    parts = [p.strip() for p in text.split(",")]
    usage = "use window=center,width[,function] with function linear, linear-exact or sigmoid"
    if len(parts) not in (2, 3):
        raise InvalidQuery(f"window={text!r}: {usage}")
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise InvalidQuery(f"window={text!r}: center and width must be numbers; {usage}") from None
    function = _FUNCTIONS.get(parts[2].lower()) if len(parts) == 3 else "linear"
    if function is None:
        raise InvalidQuery(f"window={text!r}: unknown function {parts[2]!r}; {usage}")
    if not (math.isfinite(center) and math.isfinite(width)):
        raise InvalidQuery(f"window={text!r}: center and width must be finite")
    if width < 1 if function == "linear" else width <= 0:
        raise InvalidQuery(
            f"window={text!r}: width must be >= 1 for linear, > 0 otherwise (PS3.3 C.11.2.1.2)"
        )
    return Window(center, width, function)


def _parse_viewport(text: str) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    usage = "use viewport=width,height or viewport=width,height,sx,sy,sw,sh (pixels)"
    try:
        values = [int(p) for p in text.split(",")]
    except ValueError:
        raise InvalidQuery(f"viewport={text!r}: {usage}") from None
    if len(values) not in (2, 6):
        raise InvalidQuery(f"viewport={text!r}: {usage}")
    width, height = values[:2]
    if not (1 <= width <= MAX_VIEWPORT and 1 <= height <= MAX_VIEWPORT):
        raise InvalidQuery(f"viewport={text!r}: width and height must be 1..{MAX_VIEWPORT}")
    region = None
    if len(values) == 6:
        sx, sy, sw, sh = values[2:]
        if sx < 0 or sy < 0 or sw < 1 or sh < 1:
            raise InvalidQuery(
                f"viewport={text!r}: the source region needs sx, sy >= 0 and sw, sh >= 1"
            )
        region = (sx, sy, sw, sh)
    return (width, height), region


def render(instance: StoredInstance, frame: int, params: RenderParams) -> bytes:
    """Frame ``frame`` (1-based) as a PNG or JPEG, windowed and fitted as ``params`` say."""
    check_frames(instance, [frame])
    ds = read_instance(instance)
    array = _decode(ds, frame - 1, instance.source)
    if array.ndim == 2:
        grey = _grey_to_unit(ds, array, params.window)
        if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
            grey = 1.0 - grey
        unit = grey
    else:
        unit = _colour_to_unit(ds, array, params.window)
    image = Image.fromarray(np.round(unit * 255).astype(np.uint8))
    if params.region is not None:
        sx, sy, sw, sh = params.region
        if sx >= image.width or sy >= image.height:
            raise InvalidQuery(
                f"viewport source region starts outside the {image.width}x{image.height} image"
            )
        image = image.crop((sx, sy, min(sx + sw, image.width), min(sy + sh, image.height)))
    if params.viewport is not None:
        image = _fit(image, *params.viewport)
    out = io.BytesIO()
    if params.media_type == JPEG:
        image.save(out, format="JPEG", quality=params.quality)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    scale = min(width / image.width, height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)


def _grey_to_unit(
    ds: Dataset, stored: npt.NDArray[Any], window: Window | None
) -> npt.NDArray[np.float64]:
    """Modality LUT, then the VOI transform, to values in 0..1 (PS3.3 C.11)."""
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if window is not None:
        return apply_window(values, window)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        return _voi_lut(values, ds.VOILUTSequence[0])
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = _FUNCTIONS.get(str(ds.get("VOILUTFunction", "LINEAR")).strip().lower())
        if function != "linear" or width >= 1:
            return apply_window(values, Window(center, width, function or "linear"))
    return _min_max(values)


def _voi_lut(values: npt.NDArray[np.float64], item: Dataset) -> npt.NDArray[np.float64]:
    """The first VOI LUT (PS3.3 C.11.2.1.1), its output range scaled to 0..1.

    pydicom's apply_voi wraps inputs above 255 through an 8-bit LUT, hence this version.
    """
    entries, first, _bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit entries, little endian as crgate stores them
        lut = np.frombuffer(data, "<u2").astype(np.float64)
    else:
        lut = np.asarray(data, dtype=np.float64).ravel()  # US: a list, or one value
    entries = min(entries or 65536, lut.size)
    index = np.clip(np.floor(values) - first, 0, entries - 1).astype(np.int64)
    out = lut[index]
    lo, hi = float(lut[:entries].min()), float(lut[:entries].max())
    return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)


def _colour_to_unit(
    ds: Dataset, array: npt.NDArray[Any], window: Window | None
) -> npt.NDArray[np.float64]:
    values = np.asarray(array, dtype=np.float64)
    if window is not None:
        return apply_window(values, window)
    return np.clip(values / float((1 << int(ds.BitsStored)) - 1), 0, 1)


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return float(value)
    items = list(value)
    return float(items[0]) if items else None


def _min_max(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


def apply_window(values: npt.NDArray[Any], window: Window) -> npt.NDArray[np.float64]:
    """The VOI window functions of PS3.3 C.11.2.1.2, scaled to 0..1."""
    x = np.asarray(values, dtype=np.float64)
    c, w = window.center, window.width
    if window.function == "sigmoid":
        return np.asarray(1.0 / (1.0 + np.exp(-4.0 * (x - c) / w)), dtype=np.float64)
    if window.function == "linear-exact":
        y = (x - c) / w + 0.5
    else:
        y = (x - (c - 0.5)) / (w - 1) + 0.5 if w > 1 else (x > c - 0.5).astype(np.float64)
    return np.asarray(np.clip(y, 0.0, 1.0), dtype=np.float64)
