"""The processes docker-compose starts (`crgate migrate`, `api`, `scp`, two workers), started as
local processes against the real PostgreSQL and Redis: a PACS (dcmtk storescu) pushes a phantom
study, the MG policy auto-classifies it, and the results come back over REST and DICOMweb.

With CRGATE_COMPOSE=1 the same test targets a running compose stack instead
(CRGATE_COMPOSE_URL, default http://127.0.0.1:8080; CRGATE_COMPOSE_DICOM_PORT, default 11112;
CRGATE_COMPOSE_KEY, an admin key).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
import redis
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import create_engine, text

from tests.conftest import PG_ADMIN_URL, free_port
from tests.scp.dcmtk import output, stored_ok, storescu

pytestmark = [pytest.mark.tools, pytest.mark.slow]

CRGATE = Path(sys.executable).with_name("crgate")
REDIS_DB = 12
#: docker-compose.yml's services and commands (ports come from the environment here)
SERVICES = {
    "api": ["api"],
    "scp": ["scp"],
    "worker": ["worker", "--queues", "classify,forward", "--concurrency", "1"],
    "sweep-worker": ["worker", "--queues", "sweep", "--concurrency", "1", "--no-beat"],
}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


@dataclass
class Stack:
    url: str
    dicom_port: int
    key: str
    logs: list[Path]

    def tail(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-2500:]}" for p in self.logs if p.exists())


def _wait_ready(
    url: str, dicom_port: int, procs: list[subprocess.Popen[bytes]], logs: list[Path]
) -> None:
    """Until the api answers /readyz and the scp accepts connections (they start apart)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs, strict=False):
            assert proc.poll() is None, f"{log.name} exited early:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                socket.create_connection(("127.0.0.1", dicom_port), 2).close()
                return
        except (httpx.TransportError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError("crgate api or scp not ready after 90 s")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    if os.environ.get("CRGATE_COMPOSE") == "1":
        yield Stack(
            url=os.environ.get("CRGATE_COMPOSE_URL", "http://127.0.0.1:8080"),
            dicom_port=int(os.environ.get("CRGATE_COMPOSE_DICOM_PORT", "11112")),
            key=os.environ["CRGATE_COMPOSE_KEY"],
            logs=[],
        )
        return
    name = f"crgate_it_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    broker = f"redis://127.0.0.1:6379/{REDIS_DB}"
    redis.Redis.from_url(broker).flushdb()
    http_port, dicom_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRGATE_")}
    env.update(
        CRGATE_DATA_DIR=str(tmp_path / "data"),
        CRGATE_DATABASE_URL=PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}",
        CRGATE_BROKER_URL=broker,
        CRGATE_HTTP_PORT=str(http_port),
        CRGATE_DICOM_PORT=str(dicom_port),
        CRGATE_ALLOWED_AE="STORESCU",
        CRGATE_THREADS="1",
        # the beat's period is an hour: a complete study starts because the scp nudges
        # housekeeping when the association ends, not because a period came round
        CRGATE_ARRIVAL_SWEEP_SECONDS="3600",
    )
    migrate = subprocess.run([str(CRGATE), "migrate"], env=env, capture_output=True, text=True)
    assert migrate.returncode == 0, migrate.stderr
    procs, logs = [], []
    for name, command in SERVICES.items():
        log = tmp_path / f"{name}.log"
        with log.open("wb") as fh:
            procs.append(
                subprocess.Popen(
                    [str(CRGATE), *command],
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        logs.append(log)
    url = f"http://127.0.0.1:{http_port}"
    try:
        _wait_ready(url, dicom_port, procs, logs)
        key = (tmp_path / "data" / "admin.key").read_text().strip()
        yield Stack(url=url, dicom_port=dicom_port, key=key, logs=logs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_pacs_push_to_results_over_rest_and_dicomweb(
    stack: Stack, mg_study_files: list[Path]
) -> None:
    headers = {"Authorization": f"Bearer {stack.key}"}
    http = httpx.Client(base_url=stack.url, headers=headers, timeout=30)
    policy = http.post(
        "/policies",
        json={"modality": "MG", "cr": 20, "auto_classify": True, "expected_instances": 4},
    )
    assert policy.status_code in (201, 409), policy.text
    if policy.status_code == 409:  # a compose stack may have one already
        (mg,) = [p for p in http.get("/policies").json() if p["modality"] == "MG"]
        http.put(f"/policies/{mg['id']}", json={"auto_classify": True, "expected_instances": 4})

    pushed = storescu(stack.dicom_port, mg_study_files, aet="STORESCU")
    assert stored_ok(pushed, 4), output(pushed)
    study_uid = str(pydicom.dcmread(mg_study_files[0], stop_before_pixels=True).StudyInstanceUID)

    deadline = time.monotonic() + 240
    results: list = []  # type: ignore[type-arg]
    while time.monotonic() < deadline and not results:
        results = http.get(f"/studies/{study_uid}/results").json()
        time.sleep(0.5)
    assert results, f"no result after 240 s\n{stack.tail()}"
    (result,) = results
    assert result["applied_cr"] == 20 and len(result["images"]) == 4
    job = http.get(f"/jobs/{result['job_id']}").json()
    assert job["status"] == "succeeded" and job["trigger"] == "arrival"

    dicomweb = DICOMwebClient(url=f"{stack.url}/dicomweb", headers=headers)
    series = dicomweb.search_for_series(study_instance_uid=study_uid)
    modalities = sorted(s["00080060"]["Value"][0] for s in series)
    # original MG, derived MG, one overlay series per breast, the SR
    assert modalities == ["MG", "MG", "OT", "OT", "SR"], modalities
    report = result["outputs"]["report"]
    sr = dicomweb.retrieve_instance(study_uid, report["series_uid"], report["sop_instance_uid"])
    assert sr.SOPClassUID == SR_CLASS
    overlay = http.get(
        f"/studies/{study_uid}/results/{result['result_id']}/overlays/"
        f"{result['images'][0]['input_sop_instance_uid']}.png"
    )
    assert overlay.status_code == 200 and overlay.content.startswith(b"\x89PNG")


def test_the_commands_are_those_of_the_compose_file() -> None:
    compose = (Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text()
    for name, command in SERVICES.items():
        assert f"  {name}:" in compose
        listed = ", ".join(f'"{part}"' for part in command)
        assert f"command: [{listed}" in compose, f"{name}: {command} is not compose's command"


def test_unknown_calling_ae_is_rejected_by_the_scp_process(
    stack: Stack, mg_study_files: list[Path]
) -> None:
    if os.environ.get("CRGATE_COMPOSE") == "1":
        pytest.skip("the compose stack's allow-list is its own configuration")
    pushed = storescu(stack.dicom_port, mg_study_files[:1], aet="INTRUDER")
    assert not stored_ok(pushed, 1)
    assert "Called AE Title Not Recognized" in output(pushed) or "Calling AE" in output(pushed)
