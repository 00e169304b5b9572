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
    assert forwarded == {"target": f"PACS@127.0.0.1:{port}", "sent": 9, "failed": []}
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
