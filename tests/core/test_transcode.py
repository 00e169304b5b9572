"""Transcoding real DICOM files: output attributes, with dciodvfy and GDCM as independent checks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames, parse_basic_offsets
from pydicom.multival import MultiValue
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
)

from services.core import metrics
from services.core.dicom.io import read_dataset, write_dataset
from services.core.dicom.pixels import load_pixels
from services.core.errors import CodecError, NoPixelData, NotDicom, UnsupportedSyntax
from services.core.pipeline import TranscodeResult, decode_frames, transcode_dataset, transcode_file
from services.core.ratio import CompressionRatio
from services.lab.phantom import PhantomConfig, generate_study
from tests.dicomtools import dciodvfy_new_errors, gdcm_decode

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"

# One file per input family the foundation promises to read.
INPUTS = {
    "CT_small.dcm": "explicit little endian, signed 16-bit CT",
    "MR_small_bigendian.dcm": "explicit big endian MR",
    "MR_small_RLE.dcm": "RLE lossless",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS lossless",
    "MR_small_jp2klossless.dcm": "JPEG 2000 lossless",
    "693_J2KI.dcm": "JPEG 2000 lossy, 14 bits stored",
    "SC_rgb_jpeg_dcmtk.dcm": "JPEG baseline YBR_FULL, 8-bit colour",
    "SC_rgb_jpeg_gdcm.dcm": "JPEG lossless process 14, RGB",
    "SC_rgb_rle_2frame.dcm": "RLE, RGB, two frames",
    "ExplVR_BigEnd.dcm": "big endian RGB ultrasound",
    "image_dfl.dcm": "deflated explicit little endian, 8-bit",
}


def encapsulated_frames(ds: Dataset) -> list[bytes]:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return list(generate_frames(ds.PixelData, number_of_frames=frames))


def values(ds: Dataset, keyword: str) -> list[str]:
    value = ds[keyword].value
    return [str(v) for v in value] if isinstance(value, MultiValue) else [str(value)]


def dciodvfy_readable(source: Path, tmp_path: Path) -> Path:
    """The input as dciodvfy can read it: it cannot inflate Deflated Explicit VR files."""
    ds = pydicom.dcmread(source)
    if ds.file_meta.TransferSyntaxUID != DeflatedExplicitVRLittleEndian:
        return source
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    copy_path = tmp_path / f"inflated-{source.name}"
    ds.save_as(copy_path, enforce_file_format=True)
    return copy_path


def check_pixels_against_gdcm(result: TranscodeResult, path: Path, tmp_path: Path) -> np.ndarray:
    """GDCM decodes the written file to exactly the pixels crgate measured its metrics on."""
    assert result.dataset is not None
    ours = decode_frames(encapsulated_frames(result.dataset))
    theirs = gdcm_decode(path, tmp_path)
    np.testing.assert_array_equal(theirs.reshape(ours.shape), ours)
    return ours


@pytest.mark.tools
@pytest.mark.parametrize("name", sorted(INPUTS))
@pytest.mark.parametrize("cr", [1, 10])
def test_transcode_real_files(name: str, cr: float, tmp_path: Path) -> None:
    source = TEST_FILES / name
    out = tmp_path / "out.dcm"
    result = transcode_file(source, out, cr=cr)
    original = read_dataset(source)
    written = pydicom.dcmread(out)
    reference = load_pixels(original, name).frames

    decoded = check_pixels_against_gdcm(result, out, tmp_path).reshape(reference.shape)
    # the metrics crgate reports are those of the pixels a reader of the file gets
    assert result.max_abs_error == metrics.max_abs_error(reference, decoded)
    assert result.psnr_db == pytest.approx(metrics.psnr(reference, decoded, original.BitsStored))
    assert result.bytes_in == metrics.uncompressed_size(
        original.Rows,
        original.Columns,
        original.get("SamplesPerPixel", 1),
        int(original.get("NumberOfFrames", 1) or 1),
        original.BitsAllocated,
    )
    assert result.bytes_out == sum(len(f) + len(f) % 2 for f in encapsulated_frames(written))
    assert result.achieved_cr == pytest.approx(result.bytes_in / result.bytes_out)

    assert dciodvfy_new_errors(dciodvfy_readable(source, tmp_path), out) == []
    assert written.file_meta.MediaStorageSOPInstanceUID == written.SOPInstanceUID
    assert written.file_meta.MediaStorageSOPClassUID == written.SOPClassUID
    assert written.PixelRepresentation == original.PixelRepresentation
    assert written.BitsStored == original.BitsStored
    offsets = parse_basic_offsets(written.PixelData)
    assert len(offsets) == int(written.get("NumberOfFrames", 1) or 1)

    if cr == 1 or result.lossless:  # lossless asked, or it fit the budget the lossy search missed
        assert result.bytes_out <= result.bytes_in / cr
        assert written.file_meta.TransferSyntaxUID == JPEG2000Lossless
        assert written.SOPInstanceUID == original.SOPInstanceUID
        assert result.lossless and result.psnr_db == 100.0 and result.max_abs_error == 0
        np.testing.assert_array_equal(decoded, reference)
    else:
        assert written.file_meta.TransferSyntaxUID == JPEG2000
        assert written.SOPInstanceUID != original.SOPInstanceUID
        assert written.ImageType[0] == "DERIVED"
        assert written.LossyImageCompression == "01"
        assert values(written, "LossyImageCompressionMethod")[-1] == "ISO_15444_1"
        last = float(values(written, "LossyImageCompressionRatio")[-1])
        assert last == pytest.approx(result.achieved_cr, abs=0.005)
        assert f"{last:g}" in written.DerivationDescription
        ref = written.SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == original.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == original.SOPClassUID
    if original.get("SamplesPerPixel", 1) == 3:
        assert written.PhotometricInterpretation == ("YBR_RCT" if result.lossless else "YBR_ICT")
        assert written.PlanarConfiguration == 0


def test_lossy_history_is_appended_and_never_reset(tmp_path: Path) -> None:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = "8"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.DerivationDescription = "earlier JPEG"

    lossy = transcode_dataset(ds, cr=20)
    assert lossy.dataset is not None
    out = lossy.dataset
    assert out.LossyImageCompressionMethod == ["ISO_10918_1", "ISO_15444_1"]
    assert (
        len(out.LossyImageCompressionRatio) == 2 and float(out.LossyImageCompressionRatio[0]) == 8
    )
    assert out.DerivationDescription.startswith("earlier JPEG; ")
    purpose = out.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0]
    assert purpose.CodeValue == "121330"  # lossy compressed predecessor

    lossless = transcode_dataset(ds, cr=1)
    assert lossless.dataset is not None
    assert lossless.dataset.LossyImageCompression == "01"  # never back to 00
    assert lossless.dataset.LossyImageCompressionMethod == "ISO_10918_1"


def test_uncompressed_source_is_marked_uncompressed_predecessor() -> None:
    result = transcode_dataset(pydicom.dcmread(TEST_FILES / "MR_small.dcm"), cr=5)
    assert result.dataset is not None
    code = result.dataset.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("121320", "DCM")
    assert result.dataset.DerivationCodeSequence[-1].CodeValue == "113040"


def test_monochrome1_is_kept(tmp_path: Path) -> None:
    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    result = transcode_dataset(ds, cr=4)
    assert result.dataset is not None
    assert result.dataset.PhotometricInterpretation == "MONOCHROME1"
    write_dataset(result.dataset, tmp_path / "m1.dcm")
    assert pydicom.dcmread(tmp_path / "m1.dcm").PhotometricInterpretation == "MONOCHROME1"


@pytest.mark.tools
def test_htj2k_input(tmp_path: Path) -> None:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    original = ds.pixel_array.copy()
    ds.PixelData = encapsulate([imagecodecs.htj2k_encode(original)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    source = tmp_path / "htj2k.dcm"
    write_dataset(ds, source)
    result = transcode_file(source, tmp_path / "out.dcm", cr=1)
    decoded = check_pixels_against_gdcm(result, tmp_path / "out.dcm", tmp_path)
    np.testing.assert_array_equal(decoded[0], original)


@pytest.mark.tools
def test_mammogram_phantom_output_passes_dciodvfy_and_gdcm(tmp_path: Path) -> None:
    study = generate_study(0, seed=2, config=PhantomConfig(width=512, height=640))
    source = tmp_path / "lmlo.dcm"
    write_dataset(study.datasets["LMLO"], source)
    out = tmp_path / "lmlo-cr25.dcm"
    result = transcode_file(source, out, cr=25)
    assert result.reached and abs(result.achieved_cr / 25 - 1) <= 0.02
    assert dciodvfy_new_errors(source, out) == []
    check_pixels_against_gdcm(result, out, tmp_path)
    assert 30 < result.psnr_db < 100 and result.ssim is not None and 0.5 < result.ssim < 1


def test_multiframe_cr_is_over_all_frames() -> None:
    ds = pydicom.dcmread(TEST_FILES / "examples_ybr_color.dcm")
    result = transcode_dataset(ds, cr=1)
    assert result.dataset is not None
    assert len(encapsulated_frames(result.dataset)) == 30
    assert result.bytes_in == 240 * 320 * 3 * 30
    assert result.achieved_cr == pytest.approx(result.bytes_in / result.bytes_out)


@pytest.mark.parametrize(("name", "cr"), [("SC_rgb_rle.dcm", 10), ("MR_small.dcm", 1.5)])
def test_lossless_is_written_when_it_fits_the_budget_the_lossy_search_missed(
    name: str, cr: float, tmp_path: Path
) -> None:
    """Before: SC_rgb_rle at CR 10 was written lossy (2,460 bytes, marked lossy, new UID) when
    its lossless encode takes 1,122 bytes; at CR 1.5 the lossy search overshoots every rate."""
    ds = pydicom.dcmread(TEST_FILES / name)
    result = transcode_dataset(ds, cr=CompressionRatio(cr))
    out = result.dataset
    assert out is not None
    assert result.lossless and result.output_syntax == JPEG2000Lossless
    assert out.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert result.bytes_out <= result.bytes_in / cr and result.achieved_cr >= cr
    assert out.SOPInstanceUID == ds.SOPInstanceUID  # not a new, lossy instance
    assert out.get("LossyImageCompression", "00") == "00"
    assert "LossyImageCompressionRatio" not in out
    assert result.max_abs_error == 0
    assert result.note is not None and "lossless encode" in result.note
    write_dataset(out, tmp_path / "out.dcm")
    assert np.array_equal(pydicom.dcmread(tmp_path / "out.dcm").pixel_array, ds.pixel_array)


@pytest.mark.parametrize(
    ("name", "earlier"),
    [
        ("JPEG2000.dcm", [("2097", "ISO_15444_1")]),  # a ratio, no method: from the syntax
        ("SC_rgb_jpeg_lossy_gdcm.dcm", [("9.05250452625226", "ISO_10918_1")]),
        ("SC_jpeg_no_color_transform.dcm", [(None, "ISO_10918_1")]),  # a method, no ratio
        ("SC_rgb_jpeg.dcm", [("10", "ISO_10918_1")]),  # both: kept as they are
    ],
)
@pytest.mark.parametrize("cr", [1, 10])
def test_lossy_ratio_and_method_always_pair_up(
    name: str, earlier: list[tuple[str | None, str]], cr: float
) -> None:
    """Before: 9 of the bundled files' outputs had more ratios than methods or the reverse
    (PS3.3 C.7.6.1.1.5 asks for the same number of values)."""
    ds = pydicom.dcmread(TEST_FILES / name)
    out = transcode_dataset(ds, cr=CompressionRatio(cr)).dataset
    assert out is not None
    ratios, methods = (
        values(out, "LossyImageCompressionRatio"),
        values(out, "LossyImageCompressionMethod"),
    )
    assert len(ratios) == len(methods) >= len(earlier)
    for (ratio, method), (got_ratio, got_method) in zip(
        earlier, zip(ratios, methods, strict=True), strict=False
    ):
        assert got_method == method
        if ratio is not None:
            assert float(got_ratio) == float(ratio)
        else:  # the input's own: uncompressed bytes over its stored bytes
            assert float(got_ratio) > 1
    assert out.LossyImageCompression == "01"


def test_unreached_target_labels_the_true_ratio() -> None:
    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    result = transcode_dataset(ds, cr=5000)
    assert not result.reached and result.note and "smallest codestream" in result.note
    assert result.dataset is not None
    label = float(result.dataset.LossyImageCompressionRatio)
    assert label == pytest.approx(result.bytes_in / result.bytes_out, abs=0.005)
    assert label < 5000


@pytest.mark.parametrize(
    ("name", "error", "words"),
    [
        ("rtplan.dcm", NoPixelData, "no Pixel Data"),
        ("JPEG-lossy.dcm", CodecError, "cannot decode pixel data"),
        ("examples_palette.dcm", CodecError, "PALETTE COLOR not supported"),
        ("rtdose.dcm", CodecError, "Bits Allocated 32"),
        ("liver_1frame.dcm", CodecError, "Bits Allocated 1"),
    ],
)
def test_bad_inputs_name_file_and_reason(name: str, error: type[Exception], words: str) -> None:
    with pytest.raises(error) as info:
        transcode_dataset(read_dataset(TEST_FILES / name), cr=10, source=name)
    assert name in str(info.value) and words in str(info.value)


def test_truncated_pixel_data_is_refused_at_read() -> None:
    with pytest.raises(NotDicom, match=r"MR_truncated.dcm: truncated DICOM file .*\(7FE0,0010\)"):
        read_dataset(TEST_FILES / "MR_truncated.dcm")


def test_unsupported_syntax_names_it() -> None:
    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder installed
    with pytest.raises(UnsupportedSyntax, match=r"MPEG2.*1\.2\.840\.10008\.1\.2\.4\.100"):
        transcode_dataset(ds, cr=10, source="mpeg.dcm")


@pytest.mark.parametrize(
    ("content", "words"),
    [(b"hello, not dicom", "not a DICOM Part 10 file"), (None, "no such file")],
)
def test_not_dicom(tmp_path: Path, content: bytes | None, words: str) -> None:
    path = tmp_path / "input.dcm"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(NotDicom, match=words):
        read_dataset(path)


def test_truncated_file_is_refused_and_leaves_no_output(tmp_path: Path) -> None:
    data = (TEST_FILES / "CT_small.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises((NotDicom, CodecError)) as info:
        transcode_file(cut, out_dir / "out.dcm", cr=10)
    assert "cut.dcm" in str(info.value)
    assert list(out_dir.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    result = transcode_dataset(ds, cr=10)
    assert result.dataset is not None

    def explode(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    broken = copy.deepcopy(result.dataset)
    monkeypatch.setattr(type(broken), "save_as", explode)
    from services.core.errors import OutputError

    with pytest.raises(OutputError, match="No space left"):
        write_dataset(broken, tmp_path / "out.dcm")
    assert list(tmp_path.iterdir()) == []
