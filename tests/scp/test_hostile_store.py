"""C-STORE of hostile data sets (issue 16): each is refused with a status and an Error Comment,
nothing is stored, the next association works, and no patient value reaches the log. A NUL in
the patient's name on PostgreSQL is a refusal (0xA900), not "out of resources" (0xA700, which a
PACS retries forever). On SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from pydicom.uid import UID
from pynetdicom import AE
from sqlalchemy.orm import Session, sessionmaker

from services.core import logredact
from services.core.storage import InstanceStore
from services.scp.server import ScpServer
from tests import hostile
from tests.scp.conftest import store_files, stored_rows
from tests.scp.dcmtk import echoscu, output

# (status, the Error Comment's start) for each file a C-STORE can carry (an unknown transfer
# syntax cannot be negotiated: the SCP never sees it)
STATUSES = {
    "nul-in-patient-name": (0xA900, "the value of patient_name holds a NUL"),
    "sop-uid-swallows-patient": (0xA900, "SOP Instance UID (a value of"),
    "native-length-mismatch": (0xA900, "instance "),
    "65535x65535-with-64-bytes": (0xA900, "instance "),
    "native-labelled-jpeg2000": (0xA900, "instance "),
    "native-labelled-jpeg": (0xA900, "instance "),
    "native-labelled-rle": (0xA900, "instance "),
    "unknown-vr-in-bits-allocated": (0xA900, "instance "),
    "unknown-vr-in-sop-instance-uid": (0xA900, "the instance (its SOP Instance UID is unread"),
    "deflate-bomb": (0xA700, "the deflated data set inflates to more than"),
    "nested-sequences-3000": (0xA900, "sequences nest too deeply"),
}


def _send(port: int, path: Path, context_class: str | None = None) -> pydicom.Dataset:
    """C-STORE ``path``'s bytes as they are (not decoded), in the context its meta names."""
    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(
        context_class or meta.MediaStorageSOPClassUID, UID(meta.TransferSyntaxUID)
    )
    assoc = ae.associate("127.0.0.1", port, ae_title="CRGATE")
    assert assoc.is_established
    try:
        status: pydicom.Dataset = assoc.send_c_store(path)
    finally:
        assoc.release()
    return status


def test_hostile_data_sets_are_refused_with_comments_and_leave_nothing(
    scp: ScpServer,
    sessions: sessionmaker[Session],
    store: InstanceStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    logredact.install()
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    corpus = hostile.corpus()
    for name, (code, comment) in STATUSES.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(corpus[name])
        status = _send(scp.port, path)
        assert status.Status == code, (name, hex(status.Status), status.get("ErrorComment"))
        assert str(status.ErrorComment).startswith(comment), (name, status.ErrorComment)
        for secret in hostile.SECRETS:
            assert secret not in str(status.ErrorComment)
    proc = echoscu(scp.port)
    assert proc.returncode == 0, output(proc)
    assert stored_rows(sessions) == []
    assert store_files(store, "incoming") == [] and store_files(store, "instances") == []
    for secret in hostile.SECRETS:
        assert secret not in caplog.text, f"the log holds {secret!r}"


def test_a_data_set_of_another_sop_class_than_its_context_is_refused(
    scp: ScpServer,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CT image sent in an MR Image Storage context: 0xA900 saying so, not stored."""
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    ds = hostile.image()
    data = hostile.part10(ds)
    meta_end = 144 + int.from_bytes(data[140:144], "little")  # CT and MR UIDs: same length
    data = data[:meta_end].replace(hostile.CT.encode(), hostile.MR.encode(), 1) + data[meta_end:]
    path = tmp_path / "ct-as-mr.dcm"
    path.write_bytes(data)
    status = _send(scp.port, path, context_class=hostile.MR)
    assert status.Status == 0xA900, hex(status.Status)
    assert "sent as MR Image Storage but is CT Image Storage" in str(status.ErrorComment)
    assert stored_rows(sessions) == []
