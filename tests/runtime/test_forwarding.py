"""A result's DICOM objects forwarded by C-STORE to a real PACS peer (dcmtk storescp)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.core.config import Settings
from services.core.errors import InvalidParameter
from services.runtime import build_runtime
from services.runtime.forwarding import ForwardTarget
from tests.api.test_classify import ingest_path
from tests.conftest import free_port
from tests.dicomtools import require


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    require("storescp", "dcmtk")
    port, out = free_port(), tmp_path / "pacs"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "+xa", "-aet", "PACS", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    assert proc.poll() is None, "storescp did not start"
    yield port, out
    proc.terminate()
    proc.wait(10)


@pytest.mark.tools
def test_outputs_reach_the_configured_pacs(
    tmp_path: Path, storescp: tuple[int, Path], mg_study_files: list[Path]
) -> None:
    port, received = storescp
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=f"sqlite:///{tmp_path / 'index.db'}",
        forward_to=f"PACS@127.0.0.1:{port}",
    )
    state = build_runtime(settings, create=True)
    try:
        (study_uid,) = {ingest_path(state, p) for p in mg_study_files}
        key = (settings.data_dir / "admin.key").read_text().strip()
        with TestClient(create_app(state=state), headers={"Authorization": f"Bearer {key}"}) as c:
            body = c.post(f"/studies/{study_uid}/classify", params={"cr": 25, "wait": 120}).json()
    finally:
        state.close()
    forwarded = body["result"]["outputs"]["forwarded"]
    assert (forwarded["target"], forwarded["sent"], forwarded["failed"]) == (
        f"PACS@127.0.0.1:{port}",
        9,
        [],
    )
    assert {o["state"] for o in forwarded["objects"]} == {"sent"}
    assert "1.2.840.10008.1.2.4.91" in {o["syntax"] for o in forwarded["objects"]}  # as stored
    files = sorted(received.iterdir())
    assert len(files) == 9
    classes = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files}
    assert "1.2.840.10008.5.1.4.1.1.88.33" in classes  # the SR
    assert "1.2.840.10008.5.1.4.1.1.7" in classes  # overlay captures
    shutil.rmtree(received)


def test_unreachable_pacs_is_reported_not_fatal(mg_study_files: list[Path]) -> None:
    from services.runtime.forwarding import DicomForwarder

    report = DicomForwarder(f"PACS@127.0.0.1:{free_port()}", "CRGATE")(mg_study_files[:1])
    assert "refused or unreachable" in report["error"] and report["sent"] == 0


@pytest.mark.parametrize("text", ["PACS", "PACS@host", "@host:104", "PACS@host:0", "P@h:99999"])
def test_bad_forward_target_is_refused(text: str) -> None:
    with pytest.raises(InvalidParameter, match="AET@host:port"):
        ForwardTarget.parse(text)


def _storescp(port: int, out: Path, *options: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["storescp", *options, "-aet", "PACS", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    assert proc.poll() is None, "storescp did not start"
    return proc


@pytest.mark.tools
def test_a_peer_without_jpeg_2000_gets_the_copies_decoded(tmp_path: Path) -> None:
    """Found as a PACS engineer would: forwarding to a PACS that does not accept JPEG 2000
    failed the whole job ("internal error (ValueError)"). Plain storescp accepts only the
    uncompressed syntaxes; storescp +xa takes JPEG 2000 as well."""
    from services.core.pipeline import transcode_file
    from services.runtime.forwarding import DicomForwarder

    source = Path(str(pydicom.data.get_testdata_file("CT_small.dcm")))
    copy = tmp_path / "ct-cr10.dcm"
    result = transcode_file(source, copy, cr=10)
    assert result.decoded is not None
    for options, syntax in (((), "1.2.840.10008.1.2.1"), (("+xa",), "1.2.840.10008.1.2.4.91")):
        port, out = free_port(), tmp_path / f"pacs{len(options)}"
        out.mkdir()
        proc = _storescp(port, out, *options)
        try:
            report = DicomForwarder(f"PACS@127.0.0.1:{port}", "CRGATE")([copy, source])
        finally:
            proc.terminate()
            proc.wait(10)
        assert report["sent"] == 2 and report["failed"] == [], report
        sent = {o["sop_instance_uid"]: o for o in report["objects"]}
        assert sent[str(result.output_sop_instance_uid)]["syntax"] == syntax
        (received,) = [
            pydicom.dcmread(f)
            for f in out.iterdir()
            if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            == result.output_sop_instance_uid
        ]
        assert received.file_meta.TransferSyntaxUID == syntax
        assert received.LossyImageCompression == "01"  # decoded, still a lossy copy
        assert (received.pixel_array == result.decoded[0]).all()
