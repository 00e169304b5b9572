"""`crgate serve` as a process: HTTP and DICOM on one ingest path, clean SIGTERM, private logs."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.conftest import free_port
from tests.scp.dcmtk import findscu, getscu, output, stored_ok, storescu, suboperations

pytestmark = pytest.mark.tools

CRGATE = Path(sys.executable).with_name("crgate")


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log: Path
    url: str
    dicom_port: int


@contextmanager
def serving(tmp_path: Path, **env: str) -> Iterator[Served]:
    """`crgate serve` on free ports with a fresh data directory and ``env`` (CRGATE_*) set."""
    data_dir, log = tmp_path / "var", tmp_path / "serve.log"
    http_port, dicom_port = free_port(), free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CRGATE_")} | env
    command = [str(CRGATE), "serve", "--data-dir", str(data_dir)]
    command += ["--http-port", str(http_port), "--dicom-port", str(dicom_port)]
    with log.open("wb") as fh:
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=environ)
    try:
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"crgate serve exited early:\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"no /healthz after 60 s:\n{log.read_text()}"
            time.sleep(0.1)
        yield Served(proc, data_dir, log, url, dicom_port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """`crgate serve` on SQLite (no database URL)."""
    with serving(tmp_path) as server:
        yield server


def test_serve_stores_pushed_study_finds_it_and_stops_cleanly(
    served: Served, tiny_study_files: list[Path], tmp_path: Path
) -> None:
    key_file = served.data_dir / "admin.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()

    proc = storescu(served.dicom_port, tiny_study_files, aet="MODALITY")
    assert stored_ok(proc, len(tiny_study_files)), output(proc)

    sent = [pydicom.dcmread(p) for p in tiny_study_files]
    study_uid = sent[0].StudyInstanceUID
    found = httpx.get(
        f"{served.url}/dicomweb/studies",
        params={"StudyInstanceUID": study_uid},
        headers={"Authorization": f"Bearer {key}", "Accept": "application/dicom+json"},
        timeout=30,
    )
    assert found.status_code == 200, found.text
    (study,) = found.json()
    assert study["0020000D"]["Value"] == [study_uid]
    assert study["00201208"]["Value"] == [len(tiny_study_files)]  # instances in the study

    # the same study over DIMSE: C-FIND by patient name, C-GET of the study
    query = findscu(
        served.dicom_port,
        "QueryRetrieveLevel=STUDY",
        f"PatientName={sent[0].PatientName}",
        "StudyInstanceUID",
        out=tmp_path / "found",
    )
    (answer,) = [pydicom.dcmread(p) for p in (tmp_path / "found").glob("rsp*.dcm")]
    assert answer.StudyInstanceUID == study_uid, output(query)
    got = getscu(
        served.dicom_port,
        tmp_path / "got",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={study_uid}",
    )
    assert suboperations(got)["Completed"] == len(tiny_study_files), output(got)
    assert len(list((tmp_path / "got").iterdir())) == len(tiny_study_files)

    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(60) == 0, served.log.read_text()
    log = served.log.read_text()
    assert "DICOM SCP stopped" in log
    # the first admin key: its file is named in the log, the key itself never is
    assert f"created an admin key in {key_file}" in log
    assert key not in log and key.split("_", 2)[2] not in log
    # no allow-list configured: the SCP says it accepts any caller
    assert "DICOM SCP accepts ANY calling AE title" in log
    assert not list((served.data_dir / "incoming").iterdir())

    # privacy: the log names instances by UID, never by patient (C-FIND by name included)
    for ds in sent:
        assert ds.SOPInstanceUID in log
        name = str(ds.PatientName)
        words = [w for w in name.split("^") if len(w) >= 4 and not w.isdigit()]
        secrets = {name, *words, str(ds.PatientID), str(ds.PatientBirthDate)}
        for secret in sorted(s for s in secrets if len(s) >= 4):
            assert secret not in log, f"the serve log contains patient data {secret!r}"


@pytest.mark.slow
def test_demo_pushes_a_study_and_prints_its_auto_classification(served: Served) -> None:
    """What `make run` does after starting the server: `crgate demo` against it."""
    command = [str(CRGATE), "demo", "--url", served.url, "--data-dir", str(served.data_dir)]
    command += ["--dicom", f"CRGATE@127.0.0.1:{served.dicom_port}", "--size", "832x1024"]
    command += ["--timeout", "300"]
    env = {**os.environ, "COLUMNS": "200"}
    runs = [subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)]
    runs.append(subprocess.run(command, capture_output=True, text=True, env=env, timeout=400))
    studies = set()
    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
        text = run.stdout
        assert "cnn3-phantom" in text and "P(malignant) at CR" in text
        assert text.count("2.25.") >= 4  # the four images' SOP Instance UIDs
        (pushed,) = [line for line in text.splitlines() if line.startswith("pushing 4 images")]
        studies.add(pushed.split()[5])
        overlays = [line.split()[1] for line in text.splitlines() if line.startswith("overlay: ")]
        assert len(overlays) == 4 and all(Path(p).is_file() for p in overlays), text
    assert len(studies) == 2, "a second demo must push (and classify) a new study"
