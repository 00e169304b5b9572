"""The gateway end to end on real peers: dcmtk's storescu pushes a CT series, a US cine loop and a
mammography study into crgate's SCP; the site's policies compress (CT, US), classify (MG) and
forward; two PACS receive: Orthanc (accepts JPEG 2000) and a plain dcmtk storescp (uncompressed
only). What each PACS holds is read back (Orthanc's REST, storescp's files) and its pixels
compared with what crgate reported and stored.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from services.core.config import Settings
from services.core.db.tables import Forward, Instance
from services.core.destinations import DestinationSpec, create_destination
from services.core.dicom.uids import new_uid
from services.core.policies import PolicyKey, set_policy
from services.runtime import Runtime, build_runtime
from services.runtime.assembly import start_scp
from tests.conftest import free_port
from tests.scp import dcmtk
from tests.scp.test_orthanc import orthanc_for  # noqa: F401  (a fixture)

pytestmark = pytest.mark.tools

JPEG2000 = "1.2.840.10008.1.2.4.91"
UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
CT_SLICES = 3


@pytest.fixture
def plain_pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp with its default syntaxes: uncompressed only."""
    out = tmp_path / "plain"
    out.mkdir()
    with dcmtk.storescp(aet="PLAIN", into=out) as port:
        yield port, out


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[Runtime, int]]:
    """crgate as `crgate serve` assembles it (in-process jobs and forwards, housekeeping every
    0.2 s) with its SCP on a free port."""
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=f"sqlite:///{tmp_path / 'index.db'}",
        dicom_port=free_port(),
        arrival_sweep_seconds=0.2,
        forward_retry_seconds=0.5,
    )
    runtime = build_runtime(settings, create=True)
    scp = start_scp(runtime)
    try:
        yield runtime, settings.dicom_port
    finally:
        scp.shutdown()
        runtime.close()


def studies(folder: Path) -> dict[str, list[Path]]:
    """Three studies of one patient: CT (3 signed 16-bit slices, head), US (a 30-frame YBR cine
    loop), MG (the suite's four-view phantom is added by the test)."""
    folder.mkdir(parents=True)
    out: dict[str, list[Path]] = {"CT": [], "US": []}
    ct_study, ct_series = new_uid(), new_uid()
    for number in range(1, CT_SLICES + 1):
        ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = ct_study, ct_series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_uid()
        ds.InstanceNumber, ds.BodyPartExamined, ds.PatientAge = number, "HEAD", "050Y"
        ds.PixelData = (ds.pixel_array + 5 * number).astype(ds.pixel_array.dtype).tobytes()
        path = folder / f"ct{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out["CT"].append(path)
    us = pydicom.dcmread(str(get_testdata_file("examples_ybr_color.dcm")))
    us.StudyInstanceUID, us.SeriesInstanceUID = new_uid(), new_uid()
    us.SOPInstanceUID = us.file_meta.MediaStorageSOPInstanceUID = new_uid()
    us.PatientAge = "050Y"
    out["US"].append(folder / "us.dcm")
    us.save_as(out["US"][0], enforce_file_format=True)
    return out


def storescu(port: int, files: list[Path], *options: str) -> None:
    done = dcmtk.storescu(port, files, *options, aet="MODALITY")
    assert dcmtk.stored_ok(done, len(files)), dcmtk.output(done)


def until(check: Callable[[], Any], timeout: float = 240.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise AssertionError(f"not reached in {timeout} s: {check()!r}")


def forwards_of(runtime: Runtime, study_uid: str) -> list[Forward]:
    with runtime.sessions() as session:
        return list(session.scalars(select(Forward).where(Forward.study_uid == study_uid)))


def stored_pixels(runtime: Runtime, sop_uid: str) -> np.ndarray[Any, Any]:
    with runtime.sessions() as session:
        row = session.get(Instance, sop_uid)
        assert row is not None, sop_uid
        path = runtime.store.absolute(row.path)
    return pydicom.dcmread(path).pixel_array


def test_policies_compress_classify_and_forward_to_two_pacs(
    gateway: tuple[Runtime, int],
    plain_pacs: tuple[int, Path],
    orthanc_for: Callable[[int], str],  # noqa: F811
    mg_study_files: list[Path],
    tmp_path: Path,
) -> None:
    runtime, dicom_port = gateway
    plain_port, plain_dir = plain_pacs
    orthanc = orthanc_for(dicom_port)
    orthanc_port = int(httpx.get(f"{orthanc}/system").json()["DicomPort"])
    with runtime.sessions.begin() as session:
        create_destination(
            session, DestinationSpec("orthanc", "ORTHANC", "127.0.0.1", orthanc_port), actor="t"
        )
        create_destination(
            session, DestinationSpec("plain", "PLAIN", "127.0.0.1", plain_port), actor="t"
        )
        policy = {"auto_compress": True, "quiet_seconds": 1}
        set_policy(
            session,
            PolicyKey.of("CT", "HEAD"),
            {"cr": 10, **policy, "expected_instances": CT_SLICES, "forward_to": ["orthanc"],
             "forward_what": ["compressed"]},
            actor="t",
        )  # fmt: skip
        set_policy(
            session,
            PolicyKey.of("US"),
            {"cr": 12, "syntax": "j2k", **policy, "keep_copy": False,
             "forward_to": ["plain"], "forward_what": ["compressed"]},
            actor="t",
        )  # fmt: skip
        set_policy(
            session,
            PolicyKey.of("MG"),
            {"cr": 20, "auto_classify": True, "expected_instances": 4, "quiet_seconds": 1,
             "forward_to": ["plain"], "forward_what": ["results"]},
            actor="t",
        )  # fmt: skip
    files = studies(tmp_path / "in")
    storescu(dicom_port, [*files["CT"], *mg_study_files])
    storescu(dicom_port, files["US"], "-xy")  # as the US modality sends it: JPEG baseline
    uid = {m: str(pydicom.dcmread(p[0]).StudyInstanceUID) for m, p in files.items()}
    uid["MG"] = str(pydicom.dcmread(mg_study_files[0]).StudyInstanceUID)

    # every study forwarded, each object sent
    expected = {"CT": CT_SLICES, "US": 1, "MG": 4 + 1}  # MG results: 4 overlays, the SR
    for modality, count in expected.items():
        until(
            lambda m=modality, c=count: (
                len(rows := forwards_of(runtime, uid[m])) == c
                and all(r.state == "sent" for r in rows)
            )
        )
    states = {m: {(r.what, r.destination) for r in forwards_of(runtime, uid[m])} for m in uid}
    assert states["CT"] == {("compressed", "orthanc")}
    assert states["US"] == {("compressed", "plain")}
    assert states["MG"] == {("result", "plain")}

    # Orthanc holds the CT copies in JPEG 2000, with the pixels crgate stored
    with httpx.Client(base_url=orthanc, timeout=60) as client:
        found = client.post(
            "/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": uid["CT"]}}
        ).json()
        assert len(found) == CT_SLICES
        for instance_id in found:
            got = pydicom.dcmread(io.BytesIO(client.get(f"/instances/{instance_id}/file").content))
            assert got.file_meta.TransferSyntaxUID == JPEG2000
            assert got.LossyImageCompression == "01"
            assert np.array_equal(got.pixel_array, stored_pixels(runtime, got.SOPInstanceUID))

    # the plain PACS got the US copy decoded (it takes no JPEG 2000), still marked lossy, and
    # the MG results; the US copy is not in crgate's study (keep_copy false)
    received = [pydicom.dcmread(p) for p in plain_dir.iterdir()]
    us = [d for d in received if d.StudyInstanceUID == uid["US"]]
    (copy,) = us
    assert copy.file_meta.TransferSyntaxUID in UNCOMPRESSED
    assert copy.LossyImageCompression == "01" and int(copy.NumberOfFrames) == 30
    with runtime.sessions() as session:
        assert session.get(Instance, copy.SOPInstanceUID) is None  # kept out of the study
    us_row = next(r for r in forwards_of(runtime, uid["US"]))
    kept = pydicom.dcmread(runtime.store.absolute(str(us_row.path)))
    assert np.array_equal(copy.pixel_array, kept.pixel_array)
    mg = {str(d.SOPClassUID) for d in received if d.StudyInstanceUID == uid["MG"]}
    assert mg == {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.33"}  # no copies
