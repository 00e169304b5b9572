"""C-ECHO and C-STORE from dcmtk's echoscu and storescu (real processes) into crgate's SCP;
pynetdicom sends what storescu refuses to (a data set that is noise)."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy.orm import Session, sessionmaker

from services.core.config import DuplicatePolicy
from services.core.ingest import Channel, Ingestor
from services.core.pipeline import transcode_file
from services.core.storage import InstanceStore
from services.scp.server import ScpServer
from tests.scp.conftest import StartScp, store_files, stored_rows
from tests.scp.dcmtk import echoscu, output, stored_ok, storescu, successes

pytestmark = pytest.mark.tools

SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def error_comment(text: str) -> str | None:
    """The Error Comment storescu -d printed in a C-STORE response, if any."""
    match = re.search(r"\(0000,0902\) LO \[(.*?)\]", text)
    return match.group(1) if match else None


def test_echo(scp: ScpServer) -> None:
    proc = echoscu(scp.port)
    assert proc.returncode == 0, output(proc)


def test_store_tiny_study(
    scp: ScpServer,
    tiny_study_files: list[Path],
    sessions: sessionmaker[Session],
    store: InstanceStore,
) -> None:
    proc = storescu(scp.port, tiny_study_files, aet="MODALITY1")
    assert stored_ok(proc, len(tiny_study_files)), output(proc)

    rows = {r.sop_instance_uid: r for r in stored_rows(sessions)}
    assert len(rows) == len(tiny_study_files)
    for path in tiny_study_files:
        sent = pydicom.dcmread(path)
        row = rows[sent.SOPInstanceUID]
        assert (row.channel, row.source) == ("dimse", "MODALITY1")
        kept = pydicom.dcmread(store.absolute(row.path))
        assert kept.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert kept.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
        assert kept.PixelData == sent.PixelData
        assert kept.StudyInstanceUID == sent.StudyInstanceUID
    assert store_files(store, "incoming") == []


@pytest.mark.parametrize(
    ("name", "propose"),
    [("JPEG2000.dcm", "--propose-j2k-lossy"), ("MR_small_RLE.dcm", "--propose-rle")],
)
def test_compressed_instances_are_kept_as_received(
    scp: ScpServer,
    sessions: sessionmaker[Session],
    store: InstanceStore,
    name: str,
    propose: str,
) -> None:
    path = Path(str(get_testdata_file(name)))
    sent = pydicom.dcmread(path)
    proc = storescu(scp.port, [path], propose, "--required")
    assert stored_ok(proc, 1), output(proc)
    (row,) = stored_rows(sessions)
    assert row.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID
    kept = pydicom.dcmread(store.absolute(row.path))
    assert kept.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert kept.PixelData == sent.PixelData  # the encapsulated fragments, byte for byte


@pytest.mark.parametrize("syntax", ["htj2k", "htj2k-lossless", "htj2k-rpcl"])
def test_htj2k_instances_are_kept_as_received(
    scp: ScpServer,
    sessions: sessionmaker[Session],
    store: InstanceStore,
    tmp_path: Path,
    syntax: str,
) -> None:
    """dcmtk 3.6.7 does not know the HTJ2K syntaxes: pynetdicom sends crgate's own HT copies
    over a real association, in their own transfer syntax."""
    ht = tmp_path / "ht.dcm"
    cr = 10 if syntax == "htj2k" else 1
    transcode_file(Path(str(get_testdata_file("CT_small.dcm"))), ht, cr=cr, syntax=syntax)
    sent = pydicom.dcmread(ht)
    ae = AE(ae_title="HTSENDER")
    ae.add_requested_context(sent.SOPClassUID, sent.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CRGATE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ht)
    finally:
        assoc.release()
    assert status.Status == 0x0000, hex(status.Status)
    (row,) = stored_rows(sessions)
    assert row.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID
    kept = pydicom.dcmread(store.absolute(row.path))
    assert kept.PixelData == sent.PixelData
    assert (kept.pixel_array == sent.pixel_array).all()


def test_missing_pixel_data_is_refused_with_a_comment_and_the_next_association_works(
    scp: ScpServer,
    tiny_study_files: list[Path],
    sessions: sessionmaker[Session],
    store: InstanceStore,
    tmp_path: Path,
) -> None:
    ds = pydicom.dcmread(tiny_study_files[0])
    del ds.PixelData
    no_pixels = tmp_path / "no-pixels.dcm"
    ds.save_as(no_pixels)

    proc = storescu(scp.port, [no_pixels])
    text = output(proc)
    assert proc.returncode != 0, text
    assert (
        "DIMSE Status                  : 0xa900: Error: Data Set does not match SOP Class" in text
    )
    assert error_comment(text) == "image SOP class instance without Pixel Data"

    proc = storescu(scp.port, tiny_study_files[1:2])
    assert stored_ok(proc, 1), output(proc)
    assert [r.sop_instance_uid for r in stored_rows(sessions)] == [
        pydicom.dcmread(tiny_study_files[1]).SOPInstanceUID
    ]
    assert store_files(store, "incoming") == []


@SQLITE_ONLY
def test_same_uid_other_content_is_refused_as_a_conflict_with_policy_refuse(
    scp: ScpServer,
    ingestor: Ingestor,
    tiny_study_files: list[Path],
    sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    """CRGATE_DUPLICATE_POLICY=refuse (keep-first, the default: tests/scp/test_resend.py)."""
    ingestor.duplicate_policy = DuplicatePolicy.REFUSE
    ds = pydicom.dcmread(tiny_study_files[0])
    ds.SeriesDescription = "changed"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)

    assert stored_ok(storescu(scp.port, tiny_study_files[:1]), 1)
    assert stored_ok(storescu(scp.port, tiny_study_files[:1]), 1)  # same bytes again: success
    proc = storescu(scp.port, [changed])
    text = output(proc)
    assert proc.returncode != 0, text
    assert "0xc010" in text.lower(), text
    assert error_comment(text) == "SOP Instance UID already stored with other content"
    assert len(stored_rows(sessions)) == 1


@SQLITE_ONLY
def test_an_unexpected_error_answers_c001_and_the_server_keeps_serving(
    scp: ScpServer,
    ingestor: Ingestor,
    tiny_study_files: list[Path],
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = ingestor.ingest_file

    def broken(staged: Path, **kwargs: object) -> object:
        monkeypatch.setattr(ingestor, "ingest_file", real)  # fails once
        staged.unlink()
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(ingestor, "ingest_file", broken)
    proc = storescu(scp.port, tiny_study_files[:1])
    text = output(proc)
    assert "0xc001" in text.lower(), text
    assert error_comment(text) == "internal error: ZeroDivisionError"
    assert successes(proc) == 0, text
    assert stored_ok(storescu(scp.port, tiny_study_files[:2]), 2)
    assert len(stored_rows(sessions)) == 2


@SQLITE_ONLY
def test_unknown_calling_ae_is_rejected(start_scp: StartScp) -> None:
    server = start_scp(allowed_ae="PACS1, PACS2")
    proc = echoscu(server.port, aet="INTRUDER")
    text = output(proc)
    assert proc.returncode != 0, text
    assert "Association Rejected" in text
    assert "Result: Rejected Permanent, Source: Service User" in text
    assert "Reason: Calling AE Title Not Recognized" in text
    assert echoscu(server.port, aet="PACS2").returncode == 0


@SQLITE_ONLY
def test_unknown_source_address_is_rejected(start_scp: StartScp) -> None:
    server = start_scp(allowed_hosts="192.0.2.10")
    proc = echoscu(server.port)
    text = output(proc)
    assert proc.returncode != 0, text
    assert "Result: Rejected Permanent, Source: Service User" in text
    assert "Reason: No Reason" in text
    allowed = start_scp(allowed_hosts="192.0.2.10, 127.0.0.1")
    assert echoscu(allowed.port).returncode == 0


@SQLITE_ONLY
def test_an_undecodable_data_set_gets_c000_with_a_comment_and_the_scp_keeps_serving(
    scp: ScpServer,
    tiny_study_files: list[Path],
    sessions: sessionmaker[Session],
    store: InstanceStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sender streams a valid file meta and then noise as the data set (dcmtk's storescu
    refuses to send what it cannot parse, so pynetdicom sends the file's bytes as they are)."""
    meta = pydicom.dcmread(tiny_study_files[0]).file_meta
    header = DicomBytesIO()
    write_file_meta_info(header, meta, enforce_standard=True)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + header.getvalue() + b"\xde\xad\xbe\xef" * 256)
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)  # not decoded

    ae = AE(ae_title="NOISY")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CRGATE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(garbage)
    finally:
        assoc.release()
    assert 0xC000 <= status.Status <= 0xCFFF, hex(status.Status)
    assert status.ErrorComment == "not a complete DICOM data set (unreadable or truncated)"

    proc = echoscu(scp.port)
    assert proc.returncode == 0, output(proc)
    assert stored_rows(sessions) == []
    assert store_files(store, "incoming") == [] and store_files(store, "instances") == []


@SQLITE_ONLY
def test_an_instance_stored_by_another_channel_is_a_duplicate(
    scp: ScpServer,
    ingestor: Ingestor,
    tiny_study_files: list[Path],
    sessions: sessionmaker[Session],
    store: InstanceStore,
) -> None:
    """STOW-RS keeps the sender's file meta, the SCP writes pynetdicom's: one instance."""
    staged = store.new_staging_path()
    staged.write_bytes(tiny_study_files[0].read_bytes())
    ingestor.ingest_file(staged, channel=Channel.STOW)
    proc = storescu(scp.port, tiny_study_files[:1])
    assert stored_ok(proc, 1), output(proc)
    (row,) = stored_rows(sessions)
    assert row.channel == "stow"
    assert store.absolute(row.path).read_bytes() == tiny_study_files[0].read_bytes()
