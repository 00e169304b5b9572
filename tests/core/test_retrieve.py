"""services.core.retrieve: negotiation, transcoding, frames, rendering, lookup (real files, real
codecs, real databases)."""

from __future__ import annotations

import io
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)
from sqlalchemy.orm import Session, sessionmaker

from services.core.codecs.openjpeg import decode_codestream
from services.core.dicom.mediatype import JP2, OCTET
from services.core.dicom.uids import new_uid
from services.core.errors import InvalidUID, NotFound
from services.core.ingest import Channel, Ingestor
from services.core.retrieve import (
    bulkdata,
    frames,
    lookup,
    negotiation,
    rendering,
    transcoding,
    windowing,
)
from services.core.retrieve.errors import InvalidQuery, NotAcceptable
from services.core.retrieve.lookup import StoredInstance
from services.core.retrieve.negotiation import AS_STORED, FrameFormat
from services.core.retrieve.windowing import Window
from services.core.storage import InstanceStore

DICOM_90 = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.90'


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing"
    return Path(path)


def stored(path: Path) -> StoredInstance:
    """A StoredInstance for a file outside any store (what the index would say about it)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return StoredInstance(
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        path=path,
        frames=int(ds.get("NumberOfFrames") or 1),
        is_image="Rows" in ds,
    )


def reread(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


# -- Accept parsing and negotiation ------------------------------------------------------------


def test_parse_accept_orders_by_q_then_position_and_drops_q0() -> None:
    ranges = negotiation.parse_accept(
        'multipart/related; type="application/dicom"; q=0.5, */*;q=0, '
        "multipart/related; type=Application/DICOM; transfer-syntax=*, image/png",
        offered=["x"],
    )
    assert [(r.media_type, r.params.get("transfer-syntax"), r.q) for r in ranges] == [
        ("multipart/related", "*", 1.0),
        ("image/png", None, 1.0),
        ("multipart/related", None, 0.5),
    ]
    assert ranges[0].params["type"] == "application/dicom"
    assert negotiation.parse_accept(None, ["x"]) == negotiation.parse_accept("  ", ["x"]) == []


@pytest.mark.parametrize(
    "header", ["garbage", "text/plain; charset", "image/png; q=2", "image/png; q=abc", "a/b/c"]
)
def test_unparsable_accept_is_not_acceptable_and_lists_offers(header: str) -> None:
    with pytest.raises(NotAcceptable) as info:
        negotiation.parse_accept(header, ["image/png", "image/jpeg"])
    assert info.value.offered == ["image/png", "image/jpeg"]
    assert "image/jpeg" in str(info.value)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, ExplicitVRLittleEndian),
        ("*/*", ExplicitVRLittleEndian),
        ('multipart/related; type="application/dicom"', ExplicitVRLittleEndian),
        ("multipart/related; type=application/dicom; transfer-syntax=*", AS_STORED),
        (DICOM_90, JPEG2000Lossless),
        (DICOM_90.replace("4.90", "4.91"), JPEG2000),
        (  # q-values beat order
            f"{DICOM_90}; q=0.4, multipart/related; type=application/dicom; "
            "transfer-syntax=1.2.840.10008.1.2.1; q=0.8",
            ExplicitVRLittleEndian,
        ),
        (  # an unsupported first choice falls through to the next
            DICOM_90.replace("4.90", "4.50") + ", " + DICOM_90,
            JPEG2000Lossless,
        ),
    ],
)
def test_negotiate_instances(accept: str | None, expected: str) -> None:
    assert negotiation.negotiate_instances(accept, {ExplicitVRLittleEndian}) == expected


def test_negotiate_instances_refuses_what_it_cannot_make() -> None:
    jpeg = DICOM_90.replace("4.90", "4.50")
    with pytest.raises(NotAcceptable) as info:
        negotiation.negotiate_instances(jpeg, {ExplicitVRLittleEndian, JPEG2000})
    assert (
        negotiation.offered_for_instances({ExplicitVRLittleEndian, JPEG2000}) == info.value.offered
    )
    assert any("transfer-syntax=*" in o for o in info.value.offered)
    # ... unless every instance is already stored that way
    assert negotiation.negotiate_instances(jpeg, {JPEGBaseline8Bit}) == JPEGBaseline8Bit
    with pytest.raises(NotAcceptable):
        negotiation.negotiate_instances('multipart/related; type="application/dicom+xml"', {})
    with pytest.raises(NotAcceptable):
        negotiation.negotiate_instances("application/json", {})


@pytest.mark.parametrize(
    ("accept", "stored_syntax", "expected"),
    [
        (None, JPEG2000, FrameFormat(OCTET, ExplicitVRLittleEndian)),
        ('multipart/related; type="*/*"', JPEG2000, FrameFormat(OCTET, ExplicitVRLittleEndian)),
        ('multipart/related; type="image/jp2"', JPEG2000, FrameFormat(JP2, JPEG2000)),
        ('multipart/related; type="image/jp2"', RLELossless, FrameFormat(JP2, JPEG2000Lossless)),
        (
            'multipart/related; type="image/jp2"; transfer-syntax=1.2.840.10008.1.2.4.91',
            JPEG2000Lossless,
            FrameFormat(JP2, JPEG2000),
        ),
        ("*/*; transfer-syntax=*", JPEG2000Lossless, FrameFormat(JP2, JPEG2000Lossless)),
        ("*/*; transfer-syntax=*", RLELossless, FrameFormat(OCTET, RLELossless)),
        (
            'multipart/related; type="image/jpeg", multipart/related; '
            'type="application/octet-stream"',
            JPEG2000,
            FrameFormat(OCTET, ExplicitVRLittleEndian),
        ),
    ],
)
def test_negotiate_frames(accept: str | None, stored_syntax: str, expected: FrameFormat) -> None:
    assert negotiation.negotiate_frames(accept, stored_syntax) == expected


def test_negotiate_frames_refuses_other_image_types() -> None:
    with pytest.raises(NotAcceptable) as info:
        negotiation.negotiate_frames('multipart/related; type="image/jpeg"', JPEG2000)
    assert info.value.offered == negotiation.FRAME_OFFERS
    with pytest.raises(NotAcceptable):
        negotiation.negotiate_frames(
            'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2',
            ExplicitVRLittleEndian,
        )


def test_negotiate_rendered_and_metadata() -> None:
    assert negotiation.negotiate_rendered(None) == "image/png"
    assert negotiation.negotiate_rendered("image/*") == "image/png"
    assert negotiation.negotiate_rendered("image/gif, image/jpeg;q=0.5") == "image/jpeg"
    assert negotiation.negotiate_rendered("image/png;q=0.2, image/jpeg;q=0.5") == "image/jpeg"
    with pytest.raises(NotAcceptable) as info:
        negotiation.negotiate_rendered("image/gif")
    assert info.value.offered == ["image/png", "image/jpeg"]
    negotiation.negotiate_metadata(None)
    negotiation.negotiate_metadata("application/dicom+json, application/json")
    with pytest.raises(NotAcceptable):
        negotiation.negotiate_metadata("application/dicom+xml")


# -- transcoding whole instances ---------------------------------------------------------------


def test_jpeg2000_instance_decompresses_to_explicit_le_with_equal_pixels() -> None:
    path = pydicom_file("JPEG2000.dcm")
    original = pydicom.dcmread(path)
    assert transcoding.encode_instance(stored(path), AS_STORED) is None
    assert transcoding.encode_instance(stored(path), JPEG2000) is None  # stored that way
    data = transcoding.encode_instance(stored(path), ExplicitVRLittleEndian)
    assert data is not None
    out = reread(data)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.SOPInstanceUID == original.SOPInstanceUID
    assert out.LossyImageCompression == "01"  # the history stays
    assert np.array_equal(out.pixel_array, original.pixel_array)


def test_native_instance_to_jpeg2000_lossless_and_reversible_4_91(tmp_path: Path) -> None:
    path = pydicom_file("MR_small.dcm")
    original = pydicom.dcmread(path)
    for target in (JPEG2000Lossless, JPEG2000):
        data = transcoding.encode_instance(stored(path), target, threads=1)
        assert data is not None
        out = reread(data)
        assert out.file_meta.TransferSyntaxUID == target
        assert out.SOPInstanceUID == original.SOPInstanceUID
        assert out.get("LossyImageCompression") != "01"
        assert np.array_equal(out.pixel_array, original.pixel_array)
        codestream = get_frame(out.PixelData, 0, number_of_frames=1)
        cod = codestream.index(b"\xff\x52")
        assert codestream[cod + 13] == 1, "expected the reversible 5/3 wavelet"


def test_stored_4_90_is_relabelled_4_91_without_recoding() -> None:
    path = pydicom_file("MR_small_jp2klossless.dcm")
    original = pydicom.dcmread(path)
    data = transcoding.encode_instance(stored(path), JPEG2000)
    assert data is not None
    out = reread(data)
    assert out.file_meta.TransferSyntaxUID == JPEG2000
    assert out.PixelData == original.PixelData


def test_big_endian_instance_becomes_little_endian(tmp_path: Path) -> None:
    path = pydicom_file("MR_small_bigendian.dcm")
    original = pydicom.dcmread(path)
    assert original.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    data = transcoding.encode_instance(stored(path), ExplicitVRLittleEndian)
    assert data is not None
    out = reread(data)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(out.pixel_array, original.pixel_array)
    assert out.Rows == original.Rows and out.WindowCenter == original.WindowCenter


def test_instance_without_pixels_is_relabelled() -> None:
    out = transcoding.transcode(pydicom.dcmread(pydicom_file("rtplan.dcm")), JPEG2000Lossless)
    assert out.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert reread(transcoding.dataset_bytes(out)).RTPlanLabel == out.RTPlanLabel


def test_pixels_the_codec_cannot_take_are_not_acceptable() -> None:
    ds = pydicom.dcmread(pydicom_file("rtdose.dcm"))  # 32 bits allocated
    with pytest.raises(NotAcceptable) as info:
        transcoding.transcode(ds, JPEG2000Lossless, source="rtdose")
    assert "rtdose cannot be sent as JPEG 2000" in str(info.value)
    assert any("transfer-syntax=*" in o for o in info.value.offered)


# -- frames ------------------------------------------------------------------------------------


def test_parse_frame_list_and_range_checks() -> None:
    assert frames.parse_frame_list("1, 3,2") == [1, 3, 2]
    for bad in ("0", "1,,2", "a", "-1", "1.5", ""):
        with pytest.raises(InvalidQuery):
            frames.parse_frame_list(bad)
    instance = stored(pydicom_file("SC_rgb_rle_2frame.dcm"))
    frames.check_frames(instance, [1, 2])
    with pytest.raises(NotFound, match=r"frame 3 does not exist: .* has 2 frames"):
        frames.check_frames(instance, [1, 3])


def test_frames_uncompressed_and_as_jpeg2000_from_rle_colour() -> None:
    path = pydicom_file("SC_rgb_rle_2frame.dcm")
    ds = pydicom.dcmread(path)
    decoded = ds.pixel_array
    octet = FrameFormat(OCTET, ExplicitVRLittleEndian)
    raw = frames.extract_frames(stored(path), [2, 1], octet)
    assert raw == [decoded[1].tobytes(), decoded[0].tobytes()]
    j2k = frames.extract_frames(stored(path), [2], FrameFormat(JP2, JPEG2000Lossless))
    assert np.array_equal(decode_codestream(j2k[0]), decoded[1])


def test_native_frames_are_cut_from_the_stored_bytes() -> None:
    path = pydicom_file("rtdose.dcm")  # 32-bit, multi-frame, little endian
    instance = stored(path)
    ds = pydicom.dcmread(path)
    size = len(ds.PixelData) // instance.frames
    (third,) = frames.extract_frames(instance, [3], FrameFormat(OCTET, ExplicitVRLittleEndian))
    assert third == ds.PixelData[2 * size : 3 * size]
    assert np.array_equal(np.frombuffer(third, ds.pixel_array.dtype), ds.pixel_array[2].ravel())


def test_stored_jpeg2000_frames_are_sent_as_stored() -> None:
    path = pydicom_file("JPEG2000.dcm")
    ds = pydicom.dcmread(path)
    stored_frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    (frame,) = frames.extract_frames(stored(path), [1], FrameFormat(JP2, JPEG2000))
    assert frame == stored_frame
    # a lossless request cannot reuse the irreversible stream: its pixels are re-coded exactly
    (lossless,) = frames.extract_frames(stored(path), [1], FrameFormat(JP2, JPEG2000Lossless))
    assert lossless != stored_frame
    assert np.array_equal(decode_codestream(lossless), ds.pixel_array)
    whole = bulkdata.pixel_data_bytes(stored(path), FrameFormat(OCTET, ExplicitVRLittleEndian))
    assert whole == [ds.pixel_array.astype("<i2").tobytes()]


# -- rendering ---------------------------------------------------------------------------------


def test_apply_window_follows_ps3_3_c_11_2_1_2() -> None:
    x = np.array([-100.0, 0.0, 49.5, 99.0, 100.0, 200.0])
    linear = windowing.apply_window(x, Window(50, 100))
    assert linear[0] == 0 and linear[-1] == 1
    assert linear[1] == pytest.approx(0.0, abs=0.01) and linear[3] == pytest.approx(1.0, abs=0.01)
    assert linear[2] == pytest.approx(0.5, abs=0.01)
    exact = windowing.apply_window(x, Window(50, 100, "linear-exact"))
    assert list(exact) == pytest.approx([0, 0, 0.495, 0.99, 1, 1])
    sigmoid = windowing.apply_window(x, Window(50, 100, "sigmoid"))
    assert sigmoid[2] == pytest.approx(0.5, abs=0.01) and np.all(np.diff(sigmoid) > 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": "a,b"}, "must be numbers"),
        ({"window": "40"}, "center,width"),
        ({"window": "40,0"}, "width must be >= 1"),
        ({"window": "40,80,cubic"}, "unknown function"),
        ({"window": "nan,80"}, "finite"),
        ({"viewport": "0,10"}, "1..8192"),
        ({"viewport": "10"}, "viewport=width,height"),
        ({"viewport": "10,10,-1,0,5,5"}, "source region"),
        ({"quality": "0"}, "1 to 100"),
        ({"quality": "high"}, "1 to 100"),
    ],
)
def test_bad_render_params(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidQuery, match=re.escape(message)):
        rendering.parse_render_params(
            "image/png",
            window=kwargs.get("window"),
            viewport=kwargs.get("viewport"),
            quality=kwargs.get("quality"),
        )


def test_render_params_defaults() -> None:
    params = rendering.parse_render_params("image/jpeg", window="40,80,SIGMOID", quality="70")
    assert params.window == Window(40, 80, "sigmoid") and params.quality == 70
    assert rendering.parse_render_params("image/png", thumbnail=True).viewport == (128, 128)


def _copy_with(source: Path, dest: Path, **attrs: object) -> Path:
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = new_uid()
    for name, value in attrs.items():
        if value is None:
            delattr(ds, name)
        else:
            setattr(ds, name, value)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def _png(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image)


def test_render_uses_the_stored_window_and_inverts_monochrome1(
    tiny_study_files: list[Path], tmp_path: Path
) -> None:
    path = tiny_study_files[0]
    ds = pydicom.dcmread(path)
    params = rendering.parse_render_params("image/png")
    grey = _png(rendering.render(stored(path), 1, params))
    window = Window(float(ds.WindowCenter), float(ds.WindowWidth))
    expected = np.round(windowing.apply_window(ds.pixel_array, window) * 255)
    assert grey.shape == (160, 128)
    assert np.array_equal(grey, expected.astype(np.uint8))

    mono1 = _copy_with(path, tmp_path / "m1.dcm", PhotometricInterpretation="MONOCHROME1")
    inverted = _png(rendering.render(stored(mono1), 1, params))
    assert np.array_equal(inverted, 255 - grey)


def test_render_min_max_without_window_and_explicit_window(
    tiny_study_files: list[Path], tmp_path: Path
) -> None:
    path = _copy_with(
        tiny_study_files[0], tmp_path / "nowin.dcm", WindowCenter=None, WindowWidth=None
    )
    pixels = pydicom.dcmread(path).pixel_array.astype(float)
    out = _png(rendering.render(stored(path), 1, rendering.parse_render_params("image/png")))
    lo, hi = pixels.min(), pixels.max()
    assert np.array_equal(out, np.round((pixels - lo) / (hi - lo) * 255).astype(np.uint8))
    assert out.min() == 0 and out.max() == 255
    params = rendering.parse_render_params("image/png", window="1000,500,linear")
    windowed = _png(rendering.render(stored(path), 1, params))
    expected = np.round(windowing.apply_window(pixels, Window(1000, 500)) * 255)
    assert np.array_equal(windowed, expected.astype(np.uint8))


def test_render_prefers_the_voi_lut_sequence(tiny_study_files: list[Path], tmp_path: Path) -> None:
    path = tiny_study_files[0]
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]  # input 0..255 maps to the table; above 255 -> last entry
    item.add_new(0x00283006, "US", list(range(255, -1, -1)))  # LUT Data: an inverted ramp
    ds.VOILUTSequence = Sequence([item])
    ds.SOPInstanceUID = new_uid()
    lut_path = tmp_path / "lut.dcm"
    ds.save_as(lut_path, enforce_file_format=True)
    out = _png(rendering.render(stored(lut_path), 1, rendering.parse_render_params("image/png")))
    expected = 255 - np.clip(ds.pixel_array, 0, 255)
    assert np.array_equal(out, expected.astype(np.uint8))


def test_render_jpeg_viewport_and_region(tiny_study_files: list[Path]) -> None:
    instance = stored(tiny_study_files[0])
    params = rendering.parse_render_params("image/jpeg", viewport="64,64", quality="50")
    jpeg = rendering.render(instance, 1, params)
    assert jpeg[:2] == b"\xff\xd8"
    assert Image.open(io.BytesIO(jpeg)).size == (51, 64)  # 128x160 fitted into 64x64
    crop = rendering.parse_render_params("image/png", viewport="40,20,10,20,40,20")
    assert Image.open(io.BytesIO(rendering.render(instance, 1, crop))).size == (40, 20)
    with pytest.raises(NotFound, match="has 1 frame"):
        rendering.render(instance, 2, params)


def test_iter_file_reads_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 10)
    chunks = list(lookup.iter_file(path, chunk=1000))
    assert [len(c) for c in chunks] == [1000, 1000, 560]
    assert b"".join(chunks) == path.read_bytes()


# -- lookup against the index ------------------------------------------------------------------


def _ingest(store: InstanceStore, ingestor: Ingestor, path: Path) -> None:
    staged = store.new_staging_path()
    shutil.copyfile(path, staged)
    ingestor.ingest_file(staged, channel=Channel.CLI)


def test_find_instances_at_each_level_and_not_found(
    sessions: sessionmaker[Session],
    store: InstanceStore,
    ingestor: Ingestor,
    tiny_study_files: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    for path in tiny_study_files:
        _ingest(store, ingestor, path)
    ds = pydicom.dcmread(tiny_study_files[1])
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    assert len(lookup.find_instances(sessions, store, study=study)) == 4
    (one,) = lookup.find_instances(sessions, store, study=study, series=series, sop=sop)
    assert one.sop_instance_uid == sop and one.frames == 1 and one.is_image
    assert one.transfer_syntax_uid == ExplicitVRLittleEndian
    assert one.path.read_bytes() == tiny_study_files[1].read_bytes()

    with pytest.raises(NotFound, match=r"study 1\.2\.3 is not stored"):
        lookup.find_instances(sessions, store, study="1.2.3")
    with pytest.raises(NotFound, match=r"series 1\.2\.3 of study"):
        lookup.find_instances(sessions, store, study=study, series="1.2.3")
    with pytest.raises(NotFound, match=r"instance 1\.2\.3 of series"):
        lookup.find_instances(sessions, store, study=study, series=series, sop="1.2.3")
    with pytest.raises(NotFound):  # the instance exists, but not in that series
        lookup.find_instances(sessions, store, study=study, series="1.2.4", sop=sop)
    with pytest.raises(InvalidUID):
        lookup.find_instances(sessions, store, study="../etc")

    one.path.unlink()
    with (
        caplog.at_level(logging.ERROR, logger="services.core.retrieve"),
        pytest.raises(NotFound, match="file is missing"),
    ):
        lookup.find_instances(sessions, store, study=study)
    assert any(sop in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
