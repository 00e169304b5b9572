"""WADO-RS against the real app: dicomweb-client over a real socket, and the error cases through
the in-process client. Data enters through the ingest path (not STOW)."""

from __future__ import annotations

import io
import logging
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from httpx import Response
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
)

from services.core.codecs import OutputSyntax
from services.core.codecs.codestream import read_main_header
from services.core.codecs.openjpeg import decode_codestream
from services.core.ingest import Channel
from services.core.pipeline import transcode_file
from services.core.ratio import CompressionRatio
from services.runtime import Runtime
from tests.dicomtools import gdcm_decode

EVRLE = str(ExplicitVRLittleEndian)
DICOM_TS = 'multipart/related; type="application/dicom"; transfer-syntax={}'


def ingest(state: Runtime, path: Path) -> Dataset:
    staged = state.store.new_staging_path()
    shutil.copyfile(path, staged)
    state.ingestor.ingest_file(staged, channel=Channel.CLI)
    return pydicom.dcmread(path)


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing"
    return Path(path)


@pytest.fixture
def study(state: Runtime, tiny_study_files: list[Path]) -> dict[str, Dataset]:
    """The tiny phantom study, stored; SOP Instance UID -> original dataset."""
    datasets = [ingest(state, p) for p in tiny_study_files]
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


def first(study: dict[str, Dataset]) -> Dataset:
    return next(iter(study.values()))


def url(ds: Dataset, tail: str = "") -> str:
    base = f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    return f"{base}/instances/{ds.SOPInstanceUID}{tail}"


def dicomweb(live_url: str, admin_key: str) -> DICOMwebClient:
    return DICOMwebClient(
        url=f"{live_url}/dicomweb", headers={"Authorization": f"Bearer {admin_key}"}
    )


def split_multipart(response: Response) -> list[tuple[str, bytes]]:
    """(part Content-Type, body) of each part, parsed independently of the server's writer."""
    match = re.search(r'boundary="?([^";]+)"?', response.headers["content-type"])
    assert match, response.headers["content-type"]
    delimiter = b"--" + match.group(1).encode()
    pieces = response.content.split(delimiter)
    assert pieces[0] == b"" and pieces[-1] == b"--\r\n", "malformed multipart framing"
    parts = []
    for piece in pieces[1:-1]:
        assert piece.startswith(b"\r\n") and piece.endswith(b"\r\n")
        head, _, body = piece[2:-2].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n") if ": " in line)
        parts.append((headers["Content-Type"], body))
    return parts


def problem(response: Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    return body


# -- dicomweb-client over a socket -------------------------------------------------------------


def test_dicomweb_client_retrieves_study_series_and_instance(
    study: dict[str, Dataset], live_url: str, admin_key: str
) -> None:
    client = dicomweb(live_url, admin_key)
    ds = first(study)
    got = client.retrieve_study(ds.StudyInstanceUID)
    assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(study)
    for d in got:
        assert d.file_meta.TransferSyntaxUID == EVRLE
        assert np.array_equal(d.pixel_array, study[str(d.SOPInstanceUID)].pixel_array)
    series = client.retrieve_series(ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert len(series) == 4
    one = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert one.SOPInstanceUID == ds.SOPInstanceUID and one.PixelData == ds.PixelData
    assert one.PatientID == ds.PatientID
    as_stored = client.retrieve_study(
        ds.StudyInstanceUID, media_types=(("application/dicom", "*"),)
    )
    assert {str(d.file_meta.TransferSyntaxUID) for d in as_stored} == {EVRLE}
    # stored files going out as they are: a known length, so byte ranges work
    whole = httpx.get(
        f"{live_url}/dicomweb/studies/{ds.StudyInstanceUID}",
        headers={"Authorization": f"Bearer {admin_key}", "Accept": DICOM_TS.format("*")},
    )
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    assert int(whole.headers["content-length"]) == len(whole.content)
    assert len(split_multipart(whole)) == 4
    # several transcoded instances: streamed one transcode at a time, chunked, no ranges
    streamed = httpx.get(
        f"{live_url}/dicomweb/studies/{ds.StudyInstanceUID}",
        headers={
            "Authorization": f"Bearer {admin_key}",
            "Accept": DICOM_TS.format(JPEG2000Lossless),
            "Range": "bytes=0-9",
        },
    )
    assert streamed.status_code == 200
    assert "content-length" not in streamed.headers and "accept-ranges" not in streamed.headers
    assert streamed.headers["transfer-encoding"] == "chunked"
    assert len(split_multipart(streamed)) == 4


def test_dicomweb_client_metadata_and_bulk_data(
    study: dict[str, Dataset], live_url: str, admin_key: str
) -> None:
    client = dicomweb(live_url, admin_key)
    ds = first(study)
    meta = client.retrieve_instance_metadata(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    assert meta["00080018"]["Value"] == [ds.SOPInstanceUID]
    assert meta["00280010"]["Value"] == [160] and meta["00280011"]["Value"] == [128]
    assert meta["00083002"]["Value"] == [EVRLE]  # Available Transfer Syntax UID
    pixel = meta["7FE00010"]
    assert pixel["vr"] == "OW" and "InlineBinary" not in pixel
    # absolute, built from the Host header; dicomweb-client sends Host without the port
    uri = urlsplit(pixel["BulkDataURI"])
    assert uri.scheme == "http" and uri.hostname == "127.0.0.1"
    assert uri.path == url(ds, "/bulkdata/7FE00010")
    (bulk,) = client.retrieve_bulkdata(live_url + uri.path)
    assert bulk == ds.PixelData
    assert Dataset.from_json(meta, bulk_data_uri_handler=lambda *_: b"").PatientID == ds.PatientID

    series = client.retrieve_series_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert sorted(m["00080018"]["Value"][0] for m in series) == sorted(study)
    assert len(client.retrieve_study_metadata(ds.StudyInstanceUID)) == 4


def test_dicomweb_client_frames_and_rendered(
    study: dict[str, Dataset], live_url: str, admin_key: str
) -> None:
    client = dicomweb(live_url, admin_key)
    ds = first(study)
    ids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    (raw,) = client.retrieve_instance_frames(*ids, frame_numbers=[1])
    assert raw == ds.PixelData
    (j2k,) = client.retrieve_instance_frames(
        *ids, frame_numbers=[1], media_types=(("image/jp2", str(JPEG2000Lossless)),)
    )
    assert j2k[:4] == b"\xff\x4f\xff\x51"  # a raw J2K codestream (SOC, SIZ)
    assert np.array_equal(decode_codestream(j2k), ds.pixel_array)

    png = client.retrieve_instance_rendered(*ids, media_types=("image/png",))
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (128, 160)
    jpeg = client.retrieve_instance_rendered(
        *ids, media_types=("image/jpeg",), params={"quality": 60, "window": "2000,1000,linear"}
    )
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    frame = client.retrieve_instance_frames_rendered(*ids, frame_numbers=[1])
    assert Image.open(io.BytesIO(frame)).size == (128, 160)


def test_jpeg2000_transfer_syntaxes_are_lossless_and_gdcm_decodes_them(
    study: dict[str, Dataset], live_url: str, admin_key: str, tmp_path: Path
) -> None:
    client = dicomweb(live_url, admin_key)
    ds = first(study)
    ids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    lossless = client.retrieve_instance(
        *ids, media_types=(("application/dicom", "1.2.840.10008.1.2.4.90"),)
    )
    assert lossless.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert lossless.SOPInstanceUID == ds.SOPInstanceUID
    assert lossless.LossyImageCompression == "00"
    path = tmp_path / "lossless.dcm"
    lossless.save_as(path, enforce_file_format=True)
    assert np.array_equal(gdcm_decode(path, tmp_path), ds.pixel_array)
    assert np.array_equal(lossless.pixel_array, ds.pixel_array)

    j2k = client.retrieve_series(
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        media_types=(("application/dicom", "1.2.840.10008.1.2.4.91"),),
    )
    assert len(j2k) == 4
    for d in j2k:
        assert d.file_meta.TransferSyntaxUID == JPEG2000
        assert np.array_equal(d.pixel_array, study[str(d.SOPInstanceUID)].pixel_array)


@pytest.mark.parametrize(
    ("uid", "rpcl"),
    [(HTJ2KLossless, False), (HTJ2KLosslessRPCL, True), (HTJ2K, False)],
)
def test_htj2k_transfer_syntaxes_are_lossless(
    study: dict[str, Dataset], client: TestClient, uid: str, rpcl: bool
) -> None:
    """Each HTJ2K syntax (dicomweb-client 0.59 does not know them: plain HTTP); pixels come back
    exact (reversible HT, under .203 as well), .202 with its RPCL options, the UID kept."""
    ds = first(study)
    response = client.get(url(ds), headers={"Accept": DICOM_TS.format(uid)})
    assert response.status_code == 200, response.text
    ((ctype, body),) = split_multipart(response)
    assert ctype == f"application/dicom; transfer-syntax={uid}"
    got = pydicom.dcmread(io.BytesIO(body))
    assert got.file_meta.TransferSyntaxUID == uid
    assert got.SOPInstanceUID == ds.SOPInstanceUID and got.LossyImageCompression == "00"
    assert np.array_equal(got.pixel_array, ds.pixel_array)
    header = read_main_header(get_frame(got.PixelData, 0, number_of_frames=1))
    assert header.high_throughput and header.reversible and header.tlm == rpcl
    assert header.precision == (int(ds.BitsStored),)


def test_stored_jpeg2000_instance_as_stored_and_decompressed(
    state: Runtime, client: TestClient, live_url: str, admin_key: str
) -> None:
    path = pydicom_file("JPEG2000.dcm")
    original = ingest(state, path)
    assert original.file_meta.TransferSyntaxUID == JPEG2000
    star = client.get(url(original), headers={"Accept": DICOM_TS.format("*")})
    assert star.status_code == 200, star.text
    (part,) = split_multipart(star)
    assert part == (f"application/dicom; transfer-syntax={JPEG2000}", path.read_bytes())

    default = client.get(
        url(original), headers={"Accept": 'multipart/related; type="application/dicom"'}
    )
    assert f"transfer-syntax={EVRLE}" in default.headers["content-type"]
    ((ctype, body),) = split_multipart(default)
    assert ctype == f"application/dicom; transfer-syntax={EVRLE}"
    decompressed = pydicom.dcmread(io.BytesIO(body))
    assert decompressed.file_meta.TransferSyntaxUID == EVRLE
    assert decompressed.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(decompressed.pixel_array, original.pixel_array)

    ids = (original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
    dw = dicomweb(live_url, admin_key)
    assert dw.retrieve_instance(*ids).PixelData == original.PixelData  # client default: *
    (frame,) = dw.retrieve_instance_frames(*ids, frame_numbers=[1], media_types=("image/jp2",))
    assert frame == get_frame(original.PixelData, 0, number_of_frames=1)
    (raw,) = dw.retrieve_instance_frames(*ids, frame_numbers=[1])
    assert raw == original.pixel_array.astype("<i2").tobytes()


def test_multiframe_instance_frames(state: Runtime, client: TestClient) -> None:
    original = ingest(state, pydicom_file("SC_rgb_rle_2frame.dcm"))
    response = client.get(url(original, "/frames/2,1"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(
        'multipart/related; type="application/octet-stream"'
    )
    parts = split_multipart(response)
    decoded = original.pixel_array
    assert [body for _, body in parts] == [decoded[1].tobytes(), decoded[0].tobytes()]
    assert {ctype for ctype, _ in parts} == {f"application/octet-stream; transfer-syntax={EVRLE}"}
    missing = problem(client.get(url(original, "/frames/1,3")), 404)
    assert "frame 3 does not exist" in missing["detail"] and "has 2 frames" in missing["detail"]


# -- negotiation -------------------------------------------------------------------------------


def test_unsupported_or_unparsable_accept_is_406_listing_offers(
    study: dict[str, Dataset], client: TestClient
) -> None:
    ds = first(study)
    jpeg = DICOM_TS.format("1.2.840.10008.1.2.4.50")
    for target in (url(ds), f"/dicomweb/studies/{ds.StudyInstanceUID}"):
        body = problem(client.get(target, headers={"Accept": jpeg}), 406)
        assert DICOM_TS.format("*") in body["offered"]
        assert DICOM_TS.format(JPEG2000Lossless) in body["offered"]
        assert "1.2.840.10008.1.2.4.50" in body["detail"]
    for accept in ("not a media type", 'multipart/related; type="application/dicom"; q=7'):
        assert problem(client.get(url(ds), headers={"Accept": accept}), 406)["offered"]
    frames = problem(
        client.get(
            url(ds, "/frames/1"), headers={"Accept": 'multipart/related; type="image/jpeg"'}
        ),
        406,
    )
    assert 'multipart/related; type="image/jp2"' in frames["offered"][1]
    rendered = problem(client.get(url(ds, "/rendered"), headers={"Accept": "image/gif"}), 406)
    assert rendered["offered"] == ["image/png", "image/jpeg"]
    metadata = problem(
        client.get(url(ds, "/metadata"), headers={"Accept": "application/dicom+xml"}), 406
    )
    assert "application/dicom+json" in metadata["offered"]


def test_q_values_and_order_pick_the_syntax(study: dict[str, Dataset], client: TestClient) -> None:
    ds = first(study)
    accept = f"{DICOM_TS.format(JPEG2000Lossless)}; q=0.3, {DICOM_TS.format(EVRLE)}; q=0.9"
    response = client.get(url(ds), headers={"Accept": accept})
    assert f"transfer-syntax={EVRLE}" in response.headers["content-type"]
    accept = f"{DICOM_TS.format('1.2.840.10008.1.2.4.50')}, {DICOM_TS.format(JPEG2000Lossless)}"
    response = client.get(url(ds), headers={"Accept": accept})
    ((ctype, body),) = split_multipart(response)
    assert ctype == f"application/dicom; transfer-syntax={JPEG2000Lossless}"
    assert pydicom.dcmread(io.BytesIO(body)).file_meta.TransferSyntaxUID == JPEG2000Lossless
    image = client.get(url(ds, "/rendered"), headers={"Accept": "image/png;q=0.1, image/jpeg"})
    assert image.headers["content-type"] == "image/jpeg"


# -- not found and bad parameters --------------------------------------------------------------


def test_unknown_uids_are_404_and_malformed_ones_400(
    study: dict[str, Dataset], client: TestClient
) -> None:
    ds = first(study)
    s, se = ds.StudyInstanceUID, ds.SeriesInstanceUID
    assert (
        "study 1.2.3 is not stored" in problem(client.get("/dicomweb/studies/1.2.3"), 404)["detail"]
    )
    for path in (
        f"/dicomweb/studies/{s}/series/1.2.3",
        f"/dicomweb/studies/{s}/series/{se}/instances/1.2.3",
        f"/dicomweb/studies/{s}/series/{se}/instances/1.2.3/metadata",
        "/dicomweb/studies/1.2.3/metadata",
        f"/dicomweb/studies/{s}/series/{se}/instances/1.2.3/frames/1",
        f"/dicomweb/studies/{s}/series/{se}/instances/1.2.3/rendered",
        "/dicomweb/studies/1.2.3/thumbnail",
        f"/dicomweb/studies/1.2.3/series/{se}/instances/{ds.SOPInstanceUID}",  # wrong study
    ):
        problem(client.get(path), 404)
    assert "not a valid DICOM UID" in problem(client.get("/dicomweb/studies/1.02"), 400)["detail"]
    assert "00091001" in problem(client.get(url(ds, "/bulkdata/00091001")), 404)["detail"]
    problem(client.get(url(ds, "/bulkdata/xyz")), 400)


def test_missing_file_is_404_and_logged(
    study: dict[str, Dataset], state: Runtime, client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    ds = first(study)
    path = state.store.absolute(
        f"instances/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    )
    path.unlink()
    with caplog.at_level(logging.ERROR):
        for tail in ("", "/metadata", "/frames/1", "/rendered"):
            body = problem(client.get(url(ds, tail)), 404)
            assert "file is missing" in body["detail"]
        problem(client.get(f"/dicomweb/studies/{ds.StudyInstanceUID}"), 404)
    assert any(
        r.levelno == logging.ERROR and str(ds.SOPInstanceUID) in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize(
    "query",
    [
        "window=abc",
        "window=100",
        "window=100,0",
        "window=100,200,cubic",
        "viewport=0,10",
        "viewport=a,b",
        "quality=101",
    ],
)
def test_bad_rendering_parameters_are_400(
    study: dict[str, Dataset], client: TestClient, query: str
) -> None:
    ds = first(study)
    name = query.split("=")[0]
    assert name in problem(client.get(url(ds, f"/rendered?{query}")), 400)["detail"]


def test_frame_numbers_out_of_range_or_malformed(
    study: dict[str, Dataset], client: TestClient
) -> None:
    ds = first(study)
    body = problem(client.get(url(ds, "/frames/2")), 404)
    assert body["detail"].endswith("has 1 frame")
    problem(client.get(url(ds, "/frames/1,2/rendered")), 400)
    problem(client.get(url(ds, "/frames/0")), 400)
    problem(client.get(url(ds, "/frames/x")), 400)
    problem(client.get(url(ds, "/frames/%C2%B2")), 400)  # a digit to Python, not to int()
    problem(client.get(url(ds, "/frames/2/rendered")), 404)


# -- rendering ---------------------------------------------------------------------------------


def test_rendered_window_and_monochrome1(
    state: Runtime, study: dict[str, Dataset], client: TestClient, tmp_path: Path
) -> None:
    ds = first(study)
    c, w = float(ds.WindowCenter) + 100, float(ds.WindowWidth) / 2
    query = f"/rendered?window={c:g},{w:g},linear"
    png = client.get(url(ds, query))
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    grey = np.asarray(Image.open(io.BytesIO(png.content)))
    x = ds.pixel_array.astype(float)
    expected = np.round(np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255)  # PS3.3 C.11.2.1.2
    assert np.array_equal(grey, expected.astype(np.uint8))
    assert 0 < grey.mean() < 255

    mono1 = pydicom.dcmread(io.BytesIO(Path(ds.filename).read_bytes()))
    mono1.PhotometricInterpretation = "MONOCHROME1"
    mono1.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.424242"
    mono1.save_as(tmp_path / "m1.dcm", enforce_file_format=True)
    ingest(state, tmp_path / "m1.dcm")
    inverted = client.get(url(mono1, query))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(inverted.content))), 255 - grey)


def test_thumbnails_at_every_level(study: dict[str, Dataset], client: TestClient) -> None:
    ds = first(study)
    series = f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    for path in (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/thumbnail",
        f"{series}/thumbnail",
        url(ds, "/thumbnail"),
        url(ds, "/frames/1/thumbnail"),
    ):
        response = client.get(path)
        assert response.status_code == 200, (path, response.text)
        assert Image.open(io.BytesIO(response.content)).size == (102, 128)  # fits 128x128
    small = client.get(url(ds, "/thumbnail?viewport=64,64"), headers={"Accept": "image/jpeg"})
    image = Image.open(io.BytesIO(small.content))
    assert image.format == "JPEG" and image.size == (51, 64)


# -- as stored for viewers (OHIF), bare frames, byte ranges -------------------------------------

OHIF_FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def test_frames_with_transfer_syntax_star_are_the_stored_codestream(
    state: Runtime, client: TestClient
) -> None:
    original = ingest(state, pydicom_file("JPEG2000.dcm"))
    stored = get_frame(original.PixelData, 0, number_of_frames=1)
    response = client.get(url(original, "/frames/1"), headers={"Accept": OHIF_FRAMES})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(
        f'multipart/related; type="application/octet-stream"; transfer-syntax={JPEG2000}'
    )
    ((ctype, body),) = split_multipart(response)
    assert (ctype, body) == (f"application/octet-stream; transfer-syntax={JPEG2000}", stored)
    decoded_size = original.pixel_array.nbytes
    assert len(body) < decoded_size / 5  # not decoded: 3 kB here instead of 512 kB
    # an explicit syntax still transcodes: uncompressed, or the J2K lossless re-encode
    plain = client.get(
        url(original, "/frames/1"),
        headers={"Accept": OHIF_FRAMES.replace("*", str(ExplicitVRLittleEndian))},
    )
    ((_, raw),) = split_multipart(plain)
    assert raw == original.pixel_array.astype("<i2").tobytes()
    lossless = client.get(
        url(original, "/frames/1"),
        headers={
            "Accept": f'multipart/related; type="image/jp2"; transfer-syntax={JPEG2000Lossless}'
        },
    )
    ((ctype, j2k),) = split_multipart(lossless)
    assert ctype == f"image/jp2; transfer-syntax={JPEG2000Lossless}" and j2k != stored
    assert np.array_equal(decode_codestream(j2k), original.pixel_array)


def test_a_syntax_crgate_cannot_decode_is_served_as_stored(
    state: Runtime, client: TestClient
) -> None:
    original = ingest(state, pydicom_file("JPEG-lossy.dcm"))
    syntax = str(original.file_meta.TransferSyntaxUID)
    assert syntax == "1.2.840.10008.1.2.4.51"
    stored = get_frame(original.PixelData, 0, number_of_frames=1)
    for accept in (OHIF_FRAMES, OHIF_FRAMES.replace("*", syntax)):
        response = client.get(url(original, "/frames/1"), headers={"Accept": accept})
        assert response.status_code == 200, (accept, response.text)
        assert split_multipart(response) == [
            (f"application/octet-stream; transfer-syntax={syntax}", stored)
        ]
    bulk = client.get(url(original, "/bulkdata/7FE00010"), headers={"Accept": OHIF_FRAMES})
    assert split_multipart(bulk) == [
        (f"application/octet-stream; transfer-syntax={syntax}", stored)
    ]
    whole = client.get(url(original), headers={"Accept": DICOM_TS.format("*")})
    assert split_multipart(whole)[0][1] == pydicom_file("JPEG-lossy.dcm").read_bytes()


def test_bare_octet_stream_answers_one_frame(state: Runtime, client: TestClient) -> None:
    original = ingest(state, pydicom_file("SC_rgb_rle_2frame.dcm"))
    response = client.get(
        url(original, "/frames/2"), headers={"Accept": "application/octet-stream"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == f"application/octet-stream; transfer-syntax={EVRLE}"
    assert response.content == original.pixel_array[1].tobytes()
    star = client.get(
        url(original, "/frames/1"),
        headers={"Accept": "application/octet-stream; transfer-syntax=*"},
    )
    rle = str(original.file_meta.TransferSyntaxUID)
    assert star.headers["content-type"] == f"application/octet-stream; transfer-syntax={rle}"
    assert star.content == get_frame(original.PixelData, 0, number_of_frames=2)
    two = problem(
        client.get(url(original, "/frames/1,2"), headers={"Accept": "application/octet-stream"}),
        406,
    )
    assert "ask for one frame" in two["detail"]


def test_byte_ranges_on_frames_bulk_data_and_instances(
    state: Runtime, client: TestClient, study: dict[str, Dataset]
) -> None:
    ds = first(study)
    frame = client.get(url(ds, "/frames/1"), headers={"Accept": "application/octet-stream"})
    assert frame.headers["accept-ranges"] == "bytes"
    whole = frame.content
    cases = {
        "bytes=0-99": (0, 100),
        "bytes=100-": (100, len(whole)),
        "bytes=-50": (len(whole) - 50, len(whole)),
        f"bytes=10-{len(whole) + 500}": (10, len(whole)),
    }
    for header, (lo, hi) in cases.items():
        part = client.get(
            url(ds, "/frames/1"), headers={"Accept": "application/octet-stream", "Range": header}
        )
        assert part.status_code == 206, header
        assert part.headers["content-range"] == f"bytes {lo}-{hi - 1}/{len(whole)}"
        assert part.content == whole[lo:hi] and part.headers["content-length"] == str(hi - lo)
    beyond = client.get(
        url(ds, "/frames/1"),
        headers={"Accept": "application/octet-stream", "Range": f"bytes={len(whole)}-"},
    )
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(whole)}"
    for ignored in ("bytes=0-1,5-9", "items=0-1", "bytes=9-2", "bytes=\u00b2-"):
        octet_range = {"Accept": b"application/octet-stream", "Range": ignored.encode("latin-1")}
        full = client.get(url(ds, "/frames/1"), headers=octet_range)
        assert full.status_code == 200 and full.content == whole, ignored

    # multipart answers are the same bytes each time, so ranges of them fit together
    for tail in ("", "/bulkdata/7FE00010", "/frames/1"):
        full = client.get(url(ds, tail))
        assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes"
        body = full.content
        halves = [
            client.get(url(ds, tail), headers={"Range": r})
            for r in (f"bytes=0-{len(body) // 2 - 1}", f"bytes={len(body) // 2}-")
        ]
        assert [h.status_code for h in halves] == [206, 206], tail
        assert halves[0].content + halves[1].content == body, tail
        assert halves[1].headers["content-type"] == full.headers["content-type"], tail
        # the ETag names these bytes: revalidation, and If-Range against it
        etag = full.headers["etag"]
        assert etag.startswith('"') and halves[0].headers["etag"] == etag, tail
        assert client.get(url(ds, tail), headers={"If-None-Match": etag}).status_code == 304
        assert client.get(url(ds, tail), headers={"If-None-Match": '"old"'}).status_code == 200
        current = client.get(url(ds, tail), headers={"Range": "bytes=0-9", "If-Range": etag})
        assert current.status_code == 206 and current.content == body[:10], tail
        stale = client.get(url(ds, tail), headers={"Range": "bytes=0-9", "If-Range": '"old"'})
        assert stale.status_code == 200 and stale.content == body, tail
    bare = client.get(url(ds, "/frames/1"), headers={"Accept": "application/octet-stream"})
    multi = client.get(url(ds, "/frames/1"))
    assert bare.headers["etag"] != multi.headers["etag"]  # two representations, two tags


def test_htj2k_frames_go_out_as_stored_for_transfer_syntax_star(
    state: Runtime, client: TestClient, tiny_study_files: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "ht.dcm"
    transcode_file(tiny_study_files[0], out, cr=CompressionRatio(10), syntax=OutputSyntax.HTJ2K)
    original = ingest(state, out)
    syntax = str(original.file_meta.TransferSyntaxUID)
    assert syntax in (HTJ2K, HTJ2KLossless)  # lossless when it fits the CR's byte budget
    response = client.get(url(original, "/frames/1"), headers={"Accept": OHIF_FRAMES})
    assert split_multipart(response) == [
        (
            f"application/octet-stream; transfer-syntax={syntax}",
            get_frame(original.PixelData, 0, number_of_frames=1),
        )
    ]


@pytest.mark.parametrize(
    ("accept", "media", "syntax"),
    [
        ('multipart/related; type="image/jphc"', "image/jphc", HTJ2KLossless),
        ('multipart/related; type="image/jhc"', "image/jhc", HTJ2KLossless),
        (
            f'multipart/related; type="image/jphc"; transfer-syntax={HTJ2KLosslessRPCL}',
            "image/jphc",
            HTJ2KLosslessRPCL,
        ),
        (f'multipart/related; type="*/*"; transfer-syntax={HTJ2K}', "image/jphc", HTJ2K),
    ],
)
def test_frames_as_htj2k_codestreams(
    study: dict[str, Dataset], client: TestClient, accept: str, media: str, syntax: str
) -> None:
    """Frames of a natively stored instance, asked for as HTJ2K (image/jphc, or image/jhc as
    some viewers send it): a lossless HT codestream declaring Bits Stored, exact pixels."""
    ds = first(study)
    response = client.get(url(ds, "/frames/1"), headers={"Accept": accept})
    assert response.status_code == 200, response.text
    ((ctype, body),) = split_multipart(response)
    assert ctype == f"{media}; transfer-syntax={syntax}"
    header = read_main_header(body)
    assert header.high_throughput and header.reversible
    assert header.precision == (int(ds.BitsStored),)
    assert header.tlm == (syntax == HTJ2KLosslessRPCL)
    np.testing.assert_array_equal(decode_codestream(body), ds.pixel_array)


def test_a_bare_image_jphc_answers_the_frame(study: dict[str, Dataset], client: TestClient) -> None:
    ds = first(study)
    response = client.get(url(ds, "/frames/1"), headers={"Accept": "image/jphc"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == f"image/jphc; transfer-syntax={HTJ2KLossless}"
    np.testing.assert_array_equal(decode_codestream(response.content), ds.pixel_array)
    refused = client.get(url(ds, "/frames/1"), headers={"Accept": "image/webp"})
    assert refused.status_code == 406
    assert any("image/jphc" in offer for offer in refused.json()["offered"])
