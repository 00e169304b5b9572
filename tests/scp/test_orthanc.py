"""Orthanc as a real PACS: it sends C-ECHO, C-STORE and C-FIND to crgate's SCP (a configured
modality)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from sqlalchemy.orm import Session, sessionmaker

from services.core.destinations import DestinationSpec, create_destination
from services.core.ingest import Channel, Ingestor
from services.core.storage import InstanceStore
from tests.scp.conftest import StartScp, free_port, stored_rows

pytestmark = pytest.mark.tools

ORTHANC = "/usr/sbin/Orthanc"
StartOrthanc = Callable[[int], str]


def orthanc_config(directory: Path, *, http_port: int, dicom_port: int, crgate_port: int) -> Path:
    config = {
        "Name": "crgate-test",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomModalities": {"crgate": ["CRGATE", "127.0.0.1", crgate_port]},
    }
    path = directory / "orthanc.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def orthanc_for(tmp_path: Path) -> Iterator[StartOrthanc]:
    """Start Orthanc (unprivileged, own config and storage) with crgate's SCP as a modality."""
    assert shutil.which(ORTHANC), f"{ORTHANC} not found: install the Debian package orthanc"
    started: list[subprocess.Popen[bytes]] = []

    def start(crgate_port: int) -> str:
        directory = tmp_path / "orthanc"
        directory.mkdir()
        http_port = free_port()
        config = orthanc_config(
            directory, http_port=http_port, dicom_port=free_port(), crgate_port=crgate_port
        )
        with (directory / "orthanc.log").open("wb") as log:
            proc = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT)
        started.append(proc)
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (directory / "orthanc.log").read_text()
            try:
                if httpx.get(f"{url}/system", timeout=2).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "Orthanc did not answer on its HTTP port"
            time.sleep(0.1)

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_orthanc_echoes_and_pushes_an_instance(
    start_scp: StartScp,
    orthanc_for: StartOrthanc,
    tiny_study_files: list[Path],
    sessions: sessionmaker[Session],
    store: InstanceStore,
) -> None:
    scp = start_scp(allowed_ae="ORTHANC")
    url = orthanc_for(scp.port)
    with httpx.Client(base_url=url, timeout=60) as client:
        upload = client.post("/instances", content=tiny_study_files[0].read_bytes())
        assert upload.status_code == 200, upload.text
        instance_id = upload.json()["ID"]

        echo = client.post("/modalities/crgate/echo", json={})
        assert echo.status_code == 200, echo.text
        push = client.post(
            "/modalities/crgate/store", json={"Resources": [instance_id], "Synchronous": True}
        )
        assert push.status_code == 200, push.text
        assert push.json()["FailedInstancesCount"] == 0, push.text

    sent = pydicom.dcmread(tiny_study_files[0])
    (row,) = stored_rows(sessions)
    assert (row.sop_instance_uid, row.source, row.channel) == (
        sent.SOPInstanceUID,
        "ORTHANC",
        "dimse",
    )
    kept = pydicom.dcmread(store.absolute(row.path))
    assert kept.PixelData == sent.PixelData


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_orthanc_queries_crgate_with_c_find(
    start_scp: StartScp,
    orthanc_for: StartOrthanc,
    tiny_study_files: list[Path],
    store: InstanceStore,
    ingestor: Ingestor,
) -> None:
    """Orthanc's query/retrieve client: study, then series and instances below the answer."""
    for path in tiny_study_files:
        staged = store.new_staging_path()
        staged.write_bytes(path.read_bytes())
        ingestor.ingest_file(staged, channel=Channel.CLI)
    sent = [pydicom.dcmread(p) for p in tiny_study_files]
    scp = start_scp(allowed_ae="ORTHANC")
    url = orthanc_for(scp.port)
    with httpx.Client(base_url=url, timeout=60) as client:
        query = client.post(
            "/modalities/crgate/query",
            json={"Level": "Study", "Query": {"PatientName": "phantom*", "StudyDate": ""}},
        )
        assert query.status_code == 200, query.text
        path = query.json()["Path"]
        answers = client.get(f"{path}/answers", params={"expand": "", "simplify": ""}).json()
        (study,) = answers
        assert study["StudyInstanceUID"] == sent[0].StudyInstanceUID
        assert study["StudyDate"] == sent[0].StudyDate

        series = client.post(f"{path}/answers/0/query-series", json={})
        assert series.status_code == 200, series.text
        series_path = series.json()["Path"]
        found = client.get(f"{series_path}/answers", params={"expand": "", "simplify": ""}).json()
        assert {s["SeriesInstanceUID"] for s in found} == {d.SeriesInstanceUID for d in sent}

        instances = client.post(f"{series_path}/answers/0/query-instances", json={})
        assert instances.status_code == 200, instances.text
        listed = client.get(
            f"{instances.json()['Path']}/answers", params={"expand": "", "simplify": ""}
        ).json()
        expected = {
            d.SOPInstanceUID for d in sent if d.SeriesInstanceUID == found[0]["SeriesInstanceUID"]
        }
        assert {i["SOPInstanceUID"] for i in listed} == expected


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_orthanc_retrieves_a_study_from_crgate_with_c_move(
    start_scp: StartScp,
    orthanc_for: StartOrthanc,
    tiny_study_files: list[Path],
    store: InstanceStore,
    ingestor: Ingestor,
    sessions: sessionmaker[Session],
) -> None:
    """Orthanc queries crgate, then retrieves the answer to itself (C-MOVE, its only retrieve):
    crgate opens an association to Orthanc, registered as a destination by its AE title, and
    the instances arrive with the pixels crgate stores."""
    for path in tiny_study_files:
        staged = store.new_staging_path()
        staged.write_bytes(path.read_bytes())
        ingestor.ingest_file(staged, channel=Channel.CLI)
    sent = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(p) for p in tiny_study_files)}
    scp = start_scp(allowed_ae="ORTHANC")
    url = orthanc_for(scp.port)
    with httpx.Client(base_url=url, timeout=120) as client:
        dicom_port = int(client.get("/system").json()["DicomPort"])
        with sessions.begin() as session:
            create_destination(
                session,
                DestinationSpec("orthanc", "ORTHANC", "127.0.0.1", dicom_port),
                actor="test",
            )
        query = client.post(
            "/modalities/crgate/query",
            json={"Level": "Study", "Query": {"StudyInstanceUID": ""}},
        )
        assert query.status_code == 200, query.text
        retrieve = client.post(
            f"{query.json()['Path']}/answers/0/retrieve",
            json={"TargetAet": "ORTHANC", "Synchronous": True},
        )
        assert retrieve.status_code == 200, retrieve.text
        got = client.get("/instances", params={"expand": ""}).json()
        assert len(got) == len(sent)
        for instance in got:
            tags = client.get(f"/instances/{instance['ID']}/simplified-tags").json()
            original = sent[tags["SOPInstanceUID"]]
            received = pydicom.dcmread(
                io.BytesIO(client.get(f"/instances/{instance['ID']}/file").content)
            )
            assert (received.pixel_array == original.pixel_array).all()
