"""Real Celery worker processes on the real Redis: a job runs, and a worker killed with SIGKILL
in the middle of a job loses nothing (the job finishes after a new worker starts)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from services.api.app import create_app
from services.core.config import Settings
from services.core.db.tables import Instance
from services.core.ingest import Channel
from services.lab.phantom import PhantomConfig, generate_study
from services.runtime import Runtime, build_runtime

REDIS_DB = 11  # a database of its own on the local Redis; flushed before each test
CRGATE = Path(sys.executable).parent / "crgate"


@pytest.fixture
def broker_url() -> str:
    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def worker_env(tmp_path: Path, database_url: str, broker_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CRGATE_DATA_DIR"}
    env.update(
        DATA_DIR=str(tmp_path / "var"),  # given as --data-dir: no environment trick needed
        CRGATE_DATABASE_URL=database_url,
        CRGATE_BROKER_URL=broker_url,
        CRGATE_JOB_STALE_SECONDS="6",
        CRGATE_ARRIVAL_SWEEP_SECONDS="2",
        CRGATE_BROKER_VISIBILITY_TIMEOUT="15",
        CRGATE_THREADS="1",
    )
    return env


@pytest.fixture
def producer(worker_env: dict[str, str]) -> Iterator[tuple[Runtime, TestClient, str]]:
    settings = Settings(
        data_dir=Path(worker_env["DATA_DIR"]),
        database_url=worker_env["CRGATE_DATABASE_URL"],
        broker_url=worker_env["CRGATE_BROKER_URL"],
    )
    state = build_runtime(settings, create=True)
    key = (settings.data_dir / "admin.key").read_text().strip()
    with TestClient(create_app(state=state), headers={"Authorization": f"Bearer {key}"}) as c:
        yield state, c, key
    state.close()


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(CRGATE), "worker", "--concurrency", "1", "--data-dir", env["DATA_DIR"]],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: SIGKILL reaches the pool children
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def ingest_study(state: Runtime, tmp_path: Path, size: tuple[int, int]) -> str:
    study = generate_study(2, seed=77, config=PhantomConfig(width=size[0], height=size[1]))
    for view, ds in study.datasets.items():
        path = tmp_path / f"{view}.dcm"
        ds.save_as(path, enforce_file_format=True)
        staged = state.store.new_staging_path()
        shutil.copyfile(path, staged)
        state.ingestor.ingest_file(staged, channel=Channel.STOW)
    return study.study_uid


def wait_job(client: TestClient, job_id: str, states: set[str], timeout: float) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(f"/jobs/{job_id}").json()
        if view["status"] in states:
            return view  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {view}")


@pytest.mark.slow
def test_worker_process_runs_a_job(
    producer: tuple[Runtime, TestClient, str], worker_env: dict[str, str], tmp_path: Path
) -> None:
    state, client, _ = producer
    study_uid = ingest_study(state, tmp_path, (416, 512))
    worker = start_worker(worker_env, tmp_path / "worker.log")
    try:
        response = client.post(f"/studies/{study_uid}/classify", params={"cr": 25})
        assert response.status_code == 202, response.text
        view = wait_job(client, response.json()["job"]["id"], {"succeeded", "failed"}, 180)
        assert view["status"] == "succeeded", (view, (tmp_path / "worker.log").read_text()[-3000:])
        results = client.get(f"/studies/{study_uid}/results").json()
        assert len(results) == 1 and len(results[0]["breasts"]) == 2
    finally:
        stop(worker)


@pytest.mark.slow
def test_sigkilled_worker_loses_nothing(
    producer: tuple[Runtime, TestClient, str], worker_env: dict[str, str], tmp_path: Path
) -> None:
    state, client, _ = producer
    study_uid = ingest_study(state, tmp_path, (1248, 1536))  # big enough to be caught running
    log = tmp_path / "worker.log"
    first = start_worker(worker_env, log)
    try:
        response = client.post(f"/studies/{study_uid}/classify", params={"cr": 100})
        job_id = response.json()["job"]["id"]
        running = wait_job(client, job_id, {"running", "succeeded", "failed"}, 120)
        assert running["status"] == "running", running
        os.killpg(first.pid, signal.SIGKILL)  # main process and pool child, mid-job
        first.wait(10)
        assert client.get(f"/jobs/{job_id}").json()["status"] == "running"
    finally:
        stop(first, signal.SIGKILL)
    second = start_worker(worker_env, log)
    try:
        view = wait_job(client, job_id, {"succeeded", "failed"}, 240)
        assert view["status"] == "succeeded", (view, log.read_text()[-3000:])
        assert view["attempts"] >= 2
        results = client.get(f"/studies/{study_uid}/results").json()
        assert len(results) == 1
    finally:
        stop(second)


@pytest.mark.slow
def test_job_over_the_soft_time_limit_fails_with_the_reason(
    producer: tuple[Runtime, TestClient, str], worker_env: dict[str, str], tmp_path: Path
) -> None:
    state, client, _ = producer
    study_uid = ingest_study(state, tmp_path, (1248, 1536))
    env = dict(worker_env, CRGATE_JOB_SOFT_TIME_LIMIT="1", CRGATE_JOB_TIME_LIMIT="60")
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        job_id = client.post(f"/studies/{study_uid}/classify", params={"cr": 100}).json()["job"][
            "id"
        ]
        view = wait_job(client, job_id, {"succeeded", "failed"}, 120)
        assert view["status"] == "failed"
        assert "CRGATE_JOB_SOFT_TIME_LIMIT" in view["reason"]
    finally:
        stop(worker)


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_a_job_whose_pool_child_dies_is_recovered_and_no_beat_process_can_die(
    producer: tuple[Runtime, TestClient, str], worker_env: dict[str, str], tmp_path: Path
) -> None:
    """kill -9 of the pool child mid-job: the worker's own housekeeping thread sends the job
    again once its heartbeat is stale (6 s here) and it finishes; the worker has no beat child
    process that could die unnoticed (one child: the pool's)."""
    state, client, _ = producer
    study_uid = ingest_study(state, tmp_path, (1248, 1536))
    log = tmp_path / "worker.log"
    worker = start_worker(worker_env, log)
    try:
        job_id = client.post(f"/studies/{study_uid}/classify", params={"cr": 100}).json()["job"][
            "id"
        ]
        running = wait_job(client, job_id, {"running", "succeeded", "failed"}, 120)
        assert running["status"] == "running", running
        (child,) = children(worker.pid)  # --concurrency 1 and no beat process
        os.kill(child, signal.SIGKILL)
        view = wait_job(client, job_id, {"succeeded", "failed"}, 180)
        assert view["status"] == "succeeded", (view, log.read_text()[-3000:])
        assert view["attempts"] >= 2
        assert worker.poll() is None  # the worker itself lives on
    finally:
        stop(worker)


@pytest.mark.slow
def test_a_worker_forwards_and_its_housekeeping_retries(
    producer: tuple[Runtime, TestClient, str], worker_env: dict[str, str], tmp_path: Path
) -> None:
    """The forward task runs on a worker's default queues (crgate.forward); a peer out of
    resources (0xA700) is tried again by the worker's housekeeping pass, then the object is
    sent."""
    from services.core import forwards
    from services.core.destinations import DestinationSpec, create_destination
    from tests.api.test_forwards import Pacs

    state, client, _ = producer
    study_uid = ingest_study(state, tmp_path, (64, 80))
    peer = Pacs([0xA700], comment="busy")
    worker = start_worker(
        {**worker_env, "CRGATE_FORWARD_RETRY_SECONDS": "0.5"}, tmp_path / "worker.log"
    )
    try:
        with state.sessions() as session, session.begin():
            create_destination(
                session, DestinationSpec("pacs", "PACS", "127.0.0.1", peer.port), actor="t"
            )
        with state.sessions() as session:
            uid = session.scalars(
                select(Instance.sop_instance_uid).where(Instance.study_uid == study_uid)
            ).first()
        assert uid is not None
        (row,) = forwards.request(
            state.sessions,
            state.queue,
            "pacs",
            [forwards.ForwardObject(study_uid, uid, "original")],
            "t",
        )
        deadline = time.monotonic() + 90
        while (view := client.get(f"/forwards/{row.id}").json())["state"] != "sent":
            assert time.monotonic() < deadline, (
                view,
                (tmp_path / "worker.log").read_text()[-3000:],
            )
            time.sleep(0.1)
        assert (view["attempts"], view["status"]) == (2, "0x0000")
        assert [str(ds.SOPInstanceUID) for ds in peer.received] == [uid]
    finally:
        stop(worker)
        peer.close()
