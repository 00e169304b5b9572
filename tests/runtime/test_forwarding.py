"""A result's DICOM objects forwarded by C-STORE to a real PACS peer (dcmtk storescp)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
from tests.scp import dcmtk


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    out = tmp_path / "pacs"
    out.mkdir()
    with dcmtk.storescp("+xa", into=out) as port:
        yield port, out


def _settings(tmp_path: Path, port: int) -> Settings:
    return Settings(
        data_dir=tmp_path / "var",
        database_url=f"sqlite:///{tmp_path / 'index.db'}",
        forward_to=f"PACS@127.0.0.1:{port}",
        arrival_sweep_seconds=0.1,
        forward_retry_seconds=0.2,
    )


def _until(check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    raise AssertionError(f"not reached in {timeout} s: {check()!r}")


def _sent(client: TestClient, url: str, count: int) -> Any:
    """The result once its forwards' current states say ``count`` sent."""

    def check() -> Any:
        result = client.get(url).json()
        states = result["outputs"]["forwarded"]["states"]
        return result if states and states["destinations"][0]["sent"] == count else None

    return _until(check)


@pytest.mark.tools
def test_outputs_reach_the_configured_pacs(
    tmp_path: Path, storescp: tuple[int, Path], mg_study_files: list[Path]
) -> None:
    """CRGATE_FORWARD_TO stays a shortcut: the destination forward-to, every result sent."""
    port, received = storescp
    settings = _settings(tmp_path, port)
    state = build_runtime(settings, create=True)
    try:
        (study_uid,) = {ingest_path(state, p) for p in mg_study_files}
        key = (settings.data_dir / "admin.key").read_text().strip()
        with TestClient(create_app(state=state), headers={"Authorization": f"Bearer {key}"}) as c:
            body = c.post(f"/studies/{study_uid}/classify", params={"cr": 25, "wait": 120}).json()
            url = f"/studies/{study_uid}/results/{body['result']['result_id']}"
            (asked,) = body["result"]["outputs"]["forwarded"]["destinations"]
            assert (asked["destination"], asked["objects"], len(asked["forward_ids"])) == (
                "forward-to",
                9,
                9,
            )
            states = _sent(c, url, 9)["outputs"]["forwarded"]["states"]
            assert states["failed"] == [] and states["destinations"][0]["retrying"] == 0
            rows = c.get("/forwards", params={"destination": "forward-to"}).json()["items"]
            (destination,) = c.get("/destinations").json()
    finally:
        state.close()
    assert {r["state"] for r in rows} == {"sent"} and len(rows) == 9
    assert "1.2.840.10008.1.2.4.91" in {r["syntax"] for r in rows}  # as stored
    assert (destination["name"], destination["ae_title"], destination["port"]) == (
        "forward-to",
        "PACS",
        port,
    )
    assert "1.2.840.10008.1.2.4.91" in destination["syntaxes"]  # detected at the association
    files = sorted(received.iterdir())
    assert len(files) == 9
    classes = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files}
    assert "1.2.840.10008.5.1.4.1.1.88.33" in classes  # the SR
    assert "1.2.840.10008.5.1.4.1.1.7" in classes  # overlay captures
    shutil.rmtree(received)


@pytest.mark.tools
def test_a_pacs_down_during_the_job_gets_the_result_after_a_restart(
    tmp_path: Path, mg_study_files: list[Path]
) -> None:
    """The destination is down when the job runs: the result is stored and succeeds, its
    forwards are retrying; crgate restarts, the PACS (uncompressed only) comes up, and the
    retries deliver every object, the JPEG 2000 copies decoded to the same pixels."""
    require("storescp", "dcmtk")
    port, received = free_port(), tmp_path / "pacs"
    received.mkdir()
    settings = _settings(tmp_path, port)
    state = build_runtime(settings, create=True)
    key = (settings.data_dir / "admin.key").read_text().strip()
    headers = {"Authorization": f"Bearer {key}"}
    try:
        (study_uid,) = {ingest_path(state, p) for p in mg_study_files}
        with TestClient(create_app(state=state), headers=headers) as c:
            body = c.post(f"/studies/{study_uid}/classify", params={"cr": 25, "wait": 120}).json()
            job_id = body["result"]["job_id"]
            assert c.get(f"/jobs/{job_id}").json()["status"] == "succeeded", body
            url = f"/studies/{study_uid}/results/{body['result']['result_id']}"

            def retrying() -> Any:
                states = c.get(url).json()["outputs"]["forwarded"]["states"]
                return states["destinations"][0]["retrying"] == 9 and states

            _until(retrying)
            rows = c.get("/forwards", params={"state": "retrying"}).json()["items"]
    finally:
        state.close()
    assert {r["error"] for r in rows} == {
        f"association with PACS@127.0.0.1:{port} refused or unreachable"
    }
    pacs = _storescp(port, received)  # plain storescp: uncompressed syntaxes only
    state = build_runtime(settings)  # a new process: its housekeeping sends the due retries
    try:
        with TestClient(create_app(state=state), headers=headers) as c:
            result = _sent(c, url, 9)
            assert c.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
            rows = c.get("/forwards", params={"study_uid": study_uid}).json()["items"]
    finally:
        state.close()
        pacs.terminate()
        pacs.wait(10)
    assert result["breasts"] == body["result"]["breasts"]  # the result is not touched
    assert {r["syntax"] for r in rows} <= {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2"}
    assert all(r["attempts"] >= 2 for r in rows)
    arrived = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in received.iterdir()}
    assert len(arrived) == 9
    derived = [ref["sop_instance_uid"] for ref in result["outputs"]["derived"]]
    assert derived
    for uid in derived:
        path = next(state.store.root.glob(f"instances/{study_uid}/*/{uid}.dcm"))
        stored = pydicom.dcmread(path)
        assert stored.file_meta.TransferSyntaxUID.is_compressed
        assert arrived[uid].LossyImageCompression == "01"
        assert (arrived[uid].pixel_array == stored.pixel_array).all()


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


@pytest.mark.tools
def test_a_compress_job_forwards_its_copy_kept_out_of_the_study(tmp_path: Path) -> None:
    """store=false: the JPEG 2000 copy is only among the result's files; it still goes to the
    destination (plain storescp: decoded, the same pixels, Lossy Image Compression 01)."""
    require("storescp", "dcmtk")
    port, received = free_port(), tmp_path / "pacs"
    received.mkdir()
    pacs = _storescp(port, received)
    settings = _settings(tmp_path, port)
    state = build_runtime(settings, create=True)
    key = (settings.data_dir / "admin.key").read_text().strip()
    try:
        source = Path(str(pydicom.data.get_testdata_file("CT_small.dcm")))
        study_uid = ingest_path(state, source)
        with TestClient(create_app(state=state), headers={"Authorization": f"Bearer {key}"}) as c:
            body = c.post(
                f"/studies/{study_uid}/compress", params={"cr": 10, "store": False, "wait": 120}
            ).json()
            (entry,) = body["jobs"]
            (asked,) = entry["result"]["outputs"]["forwarded"]["destinations"]
            assert (asked["destination"], asked["objects"]) == ("forward-to", 1)
            result = _sent(c, entry["result_url"], 1)
            (row,) = c.get("/forwards", params={"study_uid": study_uid}).json()["items"]
    finally:
        state.close()
        pacs.terminate()
        pacs.wait(10)
    assert result["outputs"]["derived"] == []  # nothing added to the study
    assert (row["what"], row["syntax"]) == ("compressed", "1.2.840.10008.1.2.1")
    (copy,) = state.store.root.glob(f"results/{result['result_id']}/copies/*.dcm")
    (arrived,) = [pydicom.dcmread(f) for f in received.iterdir()]
    assert arrived.SOPInstanceUID == copy.stem == row["sop_instance_uid"]
    assert arrived.LossyImageCompression == "01"
    assert (arrived.pixel_array == pydicom.dcmread(copy).pixel_array).all()
