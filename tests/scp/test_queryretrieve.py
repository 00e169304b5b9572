"""C-FIND and C-GET against crgate's SCP with dcmtk's findscu and getscu as real peers."""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
)
from sqlalchemy.orm import Session, sessionmaker

from services.core.db import qido
from services.core.ingest import Channel, Ingestor
from services.core.storage import InstanceStore
from services.scp import queryretrieve
from services.scp.server import ScpServer
from tests.conftest import TINY, generate_study
from tests.scp.conftest import StartScp
from tests.scp.dcmtk import findscu, getscu, output, suboperations

pytestmark = [pytest.mark.tools, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]

COMPRESSED = Path(str(get_testdata_file("MR_small_jp2klossless.dcm")))


def _ingest(ingestor: Ingestor, path: Path) -> None:
    staged = ingestor.store.new_staging_path()
    shutil.copyfile(path, staged)
    ingestor.ingest_file(staged, channel=Channel.CLI)


@pytest.fixture
def studies(ingestor: Ingestor, tiny_study_files: list[Path], tmp_path: Path) -> list[Path]:
    """Two phantom patients (4 instances each) and one JPEG 2000 lossless MR, stored."""
    second = tmp_path / "second"
    second.mkdir()
    files = list(tiny_study_files)
    for view, ds in generate_study(1, seed=11, config=TINY).datasets.items():
        ds.save_as(second / f"{view}.dcm", enforce_file_format=True)
        files.append(second / f"{view}.dcm")
    files.append(COMPRESSED)
    for path in files:
        _ingest(ingestor, path)
    return files


def responses(directory: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(directory.glob("rsp*.dcm"))]


def final_status(text: str) -> str:
    """findscu/getscu -d: the status of the last response (``0x0000``, ``0xa900`` ...)."""
    found = re.findall(r"DIMSE Status\s+: (0x[0-9a-fA-F]{4})", text)
    assert found, text
    return found[-1].lower()


def error_comment(text: str) -> str | None:
    match = re.search(r"\(0000,0902\) LO \[(.*?)\]", text)
    return match.group(1) if match else None


# -- C-FIND --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys",
    [
        [("PatientName", "phantom*")],
        [("PatientName", "PHANTOM^0001")],
        [("ModalitiesInStudy", "MR")],
        [("PatientID", "*")],
        [("StudyDate", "19000101-")],
    ],
)
def test_study_level_find_answers_as_qido_does(
    scp: ScpServer,
    studies: list[Path],
    sessions: sessionmaker[Session],
    tmp_path: Path,
    keys: list[tuple[str, str]],
) -> None:
    """The same keys through findscu (Study Root) and QIDO-RS's parser: the same studies."""
    proc = findscu(
        scp.port,
        "QueryRetrieveLevel=STUDY",
        *(f"{k}={v}" for k, v in keys),
        "StudyInstanceUID",
        "NumberOfStudyRelatedInstances",
        *(["PatientName"] if "PatientName" not in dict(keys) else []),
        out=tmp_path,
    )
    assert proc.returncode == 0 and final_status(output(proc)) == "0x0000", output(proc)
    found = responses(tmp_path)
    with sessions() as session:
        expected = qido.search(
            session, qido.parse_query(qido.Level.STUDY, keys), retrieve_root="http://x"
        ).items
    assert expected  # every case matches something
    assert sorted(str(r.StudyInstanceUID) for r in found) == sorted(
        e["0020000D"]["Value"][0] for e in expected
    )
    counts = {e["0020000D"]["Value"][0]: e["00201208"]["Value"][0] for e in expected}
    for response in found:
        assert response.QueryRetrieveLevel == "STUDY"
        assert int(response.NumberOfStudyRelatedInstances) == counts[response.StudyInstanceUID]


def test_patient_root_levels(scp: ScpServer, studies: list[Path], tmp_path: Path) -> None:
    originals = [pydicom.dcmread(p) for p in studies]
    patients = tmp_path / "patients"
    proc = findscu(
        scp.port,
        "QueryRetrieveLevel=PATIENT",
        "PatientID",
        "PatientName",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedInstances",
        options=["-P"],
        out=patients,
    )
    assert final_status(output(proc)) == "0x0000", output(proc)
    found = {str(r.PatientID): r for r in responses(patients)}
    assert set(found) == {str(d.PatientID) for d in originals}
    for patient_id, response in found.items():
        mine = [d for d in originals if d.PatientID == patient_id]
        assert int(response.NumberOfPatientRelatedInstances) == len(mine)
        assert int(response.NumberOfPatientRelatedStudies) == 1
        assert str(response.PatientName) == str(mine[0].PatientName)

    first = originals[0]
    images = tmp_path / "images"
    proc = findscu(
        scp.port,
        "QueryRetrieveLevel=IMAGE",
        f"PatientID={first.PatientID}",
        f"StudyInstanceUID={first.StudyInstanceUID}",
        f"SeriesInstanceUID={first.SeriesInstanceUID}",
        "SOPInstanceUID",
        "InstanceNumber",
        options=["-P"],
        out=images,
    )
    assert final_status(output(proc)) == "0x0000", output(proc)
    expected = {
        str(d.SOPInstanceUID) for d in originals if d.SeriesInstanceUID == first.SeriesInstanceUID
    }
    got = responses(images)
    assert {str(r.SOPInstanceUID) for r in got} == expected
    assert all(r.PatientID == first.PatientID and r.QueryRetrieveLevel == "IMAGE" for r in got)


def test_series_level_with_a_uid_list(scp: ScpServer, studies: list[Path], tmp_path: Path) -> None:
    originals = [pydicom.dcmread(p) for p in (studies[0], studies[4])]
    uids = "\\".join(str(d.StudyInstanceUID) for d in originals)
    proc = findscu(
        scp.port,
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={uids}",
        "SeriesInstanceUID",
        "Modality",
        "NumberOfSeriesRelatedInstances",
        out=tmp_path,
    )
    assert final_status(output(proc)) == "0x0000", output(proc)
    found = responses(tmp_path)
    assert {str(r.StudyInstanceUID) for r in found} == {str(d.StudyInstanceUID) for d in originals}
    assert {r.Modality for r in found} == {"MG"}
    assert sum(int(r.NumberOfSeriesRelatedInstances) for r in found) == 8


def test_return_keys_crgate_does_not_index_come_back_empty_with_ff01(
    scp: ScpServer, studies: list[Path], tmp_path: Path
) -> None:
    proc = findscu(
        scp.port,
        "QueryRetrieveLevel=STUDY",
        "PatientName=PHANTOM^0000",
        "PatientAge",
        "RetrieveAETitle",
        out=tmp_path,
    )
    text = output(proc)
    assert "0xff01" in text.lower() and final_status(text) == "0x0000", text
    (response,) = responses(tmp_path)
    assert "PatientAge" in response and response.PatientAge in ("", None)
    assert response.RetrieveAETitle == "CRGATE"


@pytest.mark.parametrize(
    ("keys", "options", "comment"),
    [
        (["QueryRetrieveLevel=STUDY", "PatientAge=030Y"], ["-S"], "PatientAge cannot be used"),
        (["QueryRetrieveLevel=PATIENT", "PatientID"], ["-S"], "Study Root model has no PATIENT"),
        (["QueryRetrieveLevel=WARD", "PatientID"], ["-P"], "'WARD' is not PATIENT"),
        (["QueryRetrieveLevel=STUDY", "StudyDate=2024-01-01"], ["-S"], "StudyDate: '2024"),
        (["QueryRetrieveLevel=STUDY", "SOPInstanceUID=1.2.3"], ["-S"], "is a instance-level"),
    ],
)
def test_keys_and_levels_it_cannot_answer_get_a900_with_a_comment(
    scp: ScpServer, studies: list[Path], keys: list[str], options: list[str], comment: str
) -> None:
    proc = findscu(scp.port, *keys, options=options)
    text = output(proc)
    assert final_status(text) == "0xa900", text
    assert comment in (error_comment(text) or ""), text
    assert "(0000,0901) AT" in text, text  # Offending Element


def test_c_cancel_stops_the_responses(
    scp: ScpServer, studies: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """findscu --cancel 1: Cancel (0xFE00) long before the 9 matches are all sent (each match
    is delayed by 0.2 s here, standing in for a large index)."""
    real = queryretrieve.iter_matches

    def slow(*args: Any, **kwargs: Any) -> Iterator[pydicom.Dataset]:
        for match in real(*args, **kwargs):
            time.sleep(0.2)
            yield match

    monkeypatch.setattr(queryretrieve, "iter_matches", slow)
    started = time.monotonic()
    proc = findscu(
        scp.port, "QueryRetrieveLevel=IMAGE", "SOPInstanceUID", options=["-S", "--cancel", "1"]
    )
    text = output(proc)
    assert final_status(text) == "0xfe00", text
    assert len(re.findall(r"DIMSE Status\s+: 0xff0[01]", text)) < 9
    assert time.monotonic() - started < 9 * 0.2


def test_the_ae_allow_list_applies_to_queries(
    start_scp: StartScp, studies: list[Path], tmp_path: Path
) -> None:
    scp = start_scp(allowed_ae="PACS1")
    refused = findscu(scp.port, "QueryRetrieveLevel=STUDY", "PatientID", aet="INTRUDER")
    assert refused.returncode != 0 and "Association Rejected" in output(refused)
    allowed = findscu(scp.port, "QueryRetrieveLevel=STUDY", "PatientID", aet="PACS1", out=tmp_path)
    assert final_status(output(allowed)) == "0x0000" and len(responses(tmp_path)) == 3


def test_no_patient_data_in_the_logs(
    scp: ScpServer, studies: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    proc = findscu(
        scp.port, "QueryRetrieveLevel=STUDY", "PatientName=PHANTOM^0001", "PatientID", "PatientAge"
    )
    assert final_status(output(proc)) == "0x0000", output(proc)
    patient_id = str(pydicom.dcmread(studies[4]).PatientID)
    assert "C-FIND" in caplog.text
    assert "PHANTOM" not in caplog.text.upper() and patient_id not in caplog.text


# -- C-GET ---------------------------------------------------------------------------------------


def _received(directory: Path) -> dict[str, pydicom.Dataset]:
    return {str(d.SOPInstanceUID): d for d in map(pydicom.dcmread, directory.iterdir())}


def test_get_a_study_on_the_same_association(
    scp: ScpServer, studies: list[Path], tmp_path: Path
) -> None:
    first = pydicom.dcmread(studies[0])
    out = tmp_path / "got"
    proc = getscu(
        scp.port, out, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={first.StudyInstanceUID}"
    )
    assert final_status(output(proc)) == "0x0000", output(proc)
    assert suboperations(proc) == {"Remaining": 0, "Completed": 4, "Failed": 0, "Warning": 0}
    got = _received(out)
    for path in studies[:4]:
        sent = pydicom.dcmread(path)
        kept = got[str(sent.SOPInstanceUID)]
        assert kept.PixelData == sent.PixelData
        assert [e for e in kept if e.tag.group != 2] == [e for e in sent if e.tag.group != 2]


def test_get_at_patient_level_in_implicit_vr(
    scp: ScpServer, studies: list[Path], tmp_path: Path
) -> None:
    second = pydicom.dcmread(studies[4])
    out = tmp_path / "got"
    proc = getscu(
        scp.port,
        out,
        "QueryRetrieveLevel=PATIENT",
        f"PatientID={second.PatientID}",
        options=["-P", "+xi"],
    )
    assert final_status(output(proc)) == "0x0000", output(proc)
    assert suboperations(proc)["Completed"] == 4
    got = _received(out)
    assert set(got) == {str(pydicom.dcmread(p).SOPInstanceUID) for p in studies[4:8]}
    assert 'DcmDataset::read() TransferSyntax="Little Endian Implicit"' in output(proc)


def _image_keys(ds: pydicom.Dataset) -> list[str]:
    return [
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={ds.StudyInstanceUID}",
        f"SeriesInstanceUID={ds.SeriesInstanceUID}",
        f"SOPInstanceUID={ds.SOPInstanceUID}",
    ]


@pytest.mark.parametrize("options", [["-S"], ["-S", "+xv"]])
def test_a_compressed_instance_is_decoded_for_a_peer_that_offers_uncompressed(
    scp: ScpServer, studies: list[Path], tmp_path: Path, options: list[str]
) -> None:
    """getscu proposes uncompressed syntaxes (with +xv JPEG 2000 lossless too, in the same
    contexts; crgate accepts uncompressed first): the stored JPEG 2000 instance is decoded."""
    original = pydicom.dcmread(COMPRESSED)
    out = tmp_path / "got"
    proc = getscu(scp.port, out, *_image_keys(original), options=options)
    assert final_status(output(proc)) == "0x0000", output(proc)
    assert suboperations(proc)["Completed"] == 1
    (got,) = _received(out).values()
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(got.pixel_array, original.pixel_array)


def test_a_peer_taking_only_the_stored_syntax_gets_the_stored_bytes(
    scp: ScpServer, studies: list[Path]
) -> None:
    """A pynetdicom C-GET SCU whose MR context offers JPEG 2000 lossless alone."""
    original = pydicom.dcmread(COMPRESSED)
    received: list[pydicom.Dataset] = []

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = AE(ae_title="GETTER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(MRImageStorage, [JPEG2000Lossless])
    role = build_role(MRImageStorage, scp_role=True)
    assoc = ae.associate(
        "127.0.0.1",
        scp.port,
        ae_title="CRGATE",
        ext_neg=[role],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    identifier = pydicom.Dataset()
    for key in _image_keys(original):
        keyword, _, value = key.partition("=")
        setattr(identifier, keyword, value)
    try:
        statuses = [
            int(status.Status)
            for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
            if status
        ]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    (got,) = received
    assert got.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert got.PixelData == original.PixelData  # as stored, not re-encoded


def test_get_without_the_levels_unique_key_gets_a900(
    scp: ScpServer, studies: list[Path], tmp_path: Path
) -> None:
    proc = getscu(scp.port, tmp_path / "got", "QueryRetrieveLevel=STUDY", "PatientID=*")
    text = output(proc)
    assert final_status(text) == "0xa900", text
    assert "needs StudyInstanceUID" in (error_comment(text) or ""), text
    assert not any((tmp_path / "got").iterdir())


def test_a_missing_file_is_one_failed_sub_operation(
    scp: ScpServer,
    studies: list[Path],
    store: InstanceStore,
    sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    first = pydicom.dcmread(studies[0])
    with sessions() as session:
        lost = qido.matching_instances(
            session,
            qido.parse_query(qido.Level.STUDY, [("StudyInstanceUID", str(first.StudyInstanceUID))]),
        )[0]
    store.absolute(lost.path).unlink()
    proc = getscu(
        scp.port,
        tmp_path / "got",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={first.StudyInstanceUID}",
    )
    text = output(proc)
    assert final_status(text) == "0xb000", text
    assert suboperations(proc) == {"Remaining": 0, "Completed": 3, "Failed": 1, "Warning": 0}
    assert lost.sop_instance_uid not in _received(tmp_path / "got")


def test_c_cancel_stops_a_get(scp: ScpServer, studies: list[Path]) -> None:
    """A pynetdicom C-GET SCU sends C-CANCEL while it receives the first instance: Cancel
    (0xFE00) with the counts, and no further instance arrives."""
    first = pydicom.dcmread(studies[0])
    received: list[str] = []
    context_id: list[int] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        if len(received) == 1:
            event.assoc.send_c_cancel(1, context_id[0])
        return 0x0000

    ae = AE(ae_title="GETTER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(first.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1",
        scp.port,
        ae_title="CRGATE",
        ext_neg=[build_role(first.SOPClassUID, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    context_id.extend(
        cx.context_id
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == StudyRootQueryRetrieveInformationModelGet
    )
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = first.StudyInstanceUID
    try:
        answers = [
            status
            for status, _ in assoc.send_c_get(
                identifier, StudyRootQueryRetrieveInformationModelGet, msg_id=1
            )
            if status
        ]
    finally:
        assoc.release()
    final = answers[-1]
    assert final.Status == 0xFE00, [hex(a.Status) for a in answers]
    assert len(received) < 4
    assert final.NumberOfCompletedSuboperations == len(received)
    assert final.NumberOfRemainingSuboperations == 4 - len(received)
