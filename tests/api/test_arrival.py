"""Study arrival: auto-classification by housekeeping when the policy's expected count is
reached, after its quiet period, and a late instance making a new result (in-process queue,
real classifier). The passes are run by hand here; `crgate serve` runs one every
CRGATE_ARRIVAL_SWEEP_SECONDS, a worker's beat likewise."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
from fastapi.testclient import TestClient
from sqlalchemy import update

from services.api.app import create_app
from services.core import classify, jobs
from services.core.arrivals import ArrivalTracker
from services.core.config import Settings
from services.core.contracts import JobTrigger, Payload
from services.core.db.tables import Job
from services.core.policies import PolicyKey, set_policy
from services.core.ratio import CompressionRatio
from services.runtime import Runtime, build_runtime
from tests.api.conftest import _ingest
from tests.api.test_stow import stow


def mg_policy(state: Runtime, **changes: Any) -> None:
    with state.sessions() as session, session.begin():
        set_policy(session, PolicyKey.of("MG"), changes, actor="test")  # type: ignore[arg-type]


def results_when(client: TestClient, study_uid: str, count: int, timeout: float = 120) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        results = client.get(f"/studies/{study_uid}/results").json()
        if len(results) >= count:
            return results  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"{count} result(s) for {study_uid} did not appear in {timeout} s")


def test_expected_count_reached_classifies_at_the_policy_cr(
    client: TestClient, state: Runtime, mg_study_files: list[Path]
) -> None:
    mg_policy(state, cr=20, auto_classify=True, expected_instances=4, quiet_seconds=3600)
    tracker = ArrivalTracker(state.job_context, state.queue)
    for path in mg_study_files[:3]:
        study_uid = _ingest(state, path)
    assert tracker.housekeeping() == []  # 3 of 4: not ready
    time.sleep(0.5)
    assert client.get(f"/studies/{study_uid}/results").json() == []
    _ingest(state, mg_study_files[3])
    assert len(tracker.housekeeping()) == 1
    (result,) = results_when(client, study_uid, 1)
    assert result["applied_cr"] == 20 and result["requested_cr"] is None
    assert result["policy"].startswith("policy ")
    assert len(result["images"]) == 4


def test_quiet_period_makes_a_study_ready(
    client: TestClient, state: Runtime, mg_study_files: list[Path]
) -> None:
    mg_policy(state, cr=15, auto_classify=True, expected_instances=None, quiet_seconds=1)
    for path in mg_study_files:
        study_uid = _ingest(state, path)
    tracker = ArrivalTracker(state.job_context, state.queue)
    assert tracker.housekeeping() == []  # the study is still within its quiet period
    time.sleep(1.2)
    started = tracker.housekeeping()
    assert len(started) == 1
    (result,) = results_when(client, study_uid, 1)
    assert result["applied_cr"] == 15 and len(result["images"]) == 4


def test_late_instance_makes_a_new_result_and_keeps_the_old(
    client: TestClient, state: Runtime, mg_study_files: list[Path]
) -> None:
    mg_policy(state, cr=25, auto_classify=True, expected_instances=3, quiet_seconds=3600)
    tracker = ArrivalTracker(state.job_context, state.queue)
    for path in mg_study_files[:3]:
        study_uid = _ingest(state, path)
    tracker.housekeeping()
    (first,) = results_when(client, study_uid, 1)
    _ingest(state, mg_study_files[3])  # the late fourth view
    tracker.housekeeping()
    newest, older = results_when(client, study_uid, 2)
    assert older["result_id"] == first["result_id"]
    assert len(older["images"]) == 3 and older == first
    assert len(newest["images"]) == 4


def test_no_auto_classify_means_no_job(
    client: TestClient, state: Runtime, mg_study_files: list[Path]
) -> None:
    mg_policy(state, cr=25, auto_classify=False, expected_instances=4)
    for path in mg_study_files:
        study_uid = _ingest(state, path)
    assert ArrivalTracker(state.job_context, state.queue).housekeeping() == []
    time.sleep(0.5)
    assert client.get(f"/studies/{study_uid}/results").json() == []


def test_classify_without_cr_uses_the_policy(
    client: TestClient, state: Runtime, mg_study_files: list[Path]
) -> None:
    mg_policy(state, cr=30, auto_classify=False)
    for path in mg_study_files:
        study_uid = _ingest(state, path)
    body = client.post(f"/studies/{study_uid}/classify", params={"wait": 120}).json()
    assert body["job"]["cr"] == 30 and body["job"]["requested_cr"] is None
    assert body["result"]["policy"].startswith("policy ")


class BrokerDown:
    """The producer side of a queue whose broker refuses connections."""

    def enqueue(self, payload: Payload) -> None:
        raise ConnectionError("the broker did not take the task: connection refused")


def test_housekeeping_sends_again_a_job_whose_message_was_lost(
    client: TestClient, state: Runtime, mg_study_files: list[Path]
) -> None:
    """Sending the task failed after the job was made (broker down): it would stay queued
    forever; once queued longer than CRGATE_JOB_STALE_SECONDS housekeeping sends it again."""
    for path in mg_study_files:
        study_uid = _ingest(state, path)
    job, created = classify.request(  # the broker is down: the job is recorded, not sent
        state.job_context,
        BrokerDown(),
        study_uid,
        cr=CompressionRatio(25),
        syntax=None,
        model=None,
        trigger=JobTrigger.API,
        requested_by=None,
    )
    assert created
    tracker = ArrivalTracker(state.job_context, state.queue)
    tracker.housekeeping()  # queued only just now: left alone
    time.sleep(0.5)
    assert client.get(f"/jobs/{job.id}").json()["status"] == "queued"
    stale = state.settings.job_stale_seconds + 1
    with state.sessions() as session, session.begin():
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(queued_at=jobs.now() - timedelta(seconds=stale))
        )
    tracker.housekeeping()
    (result,) = results_when(client, study_uid, 1)
    assert result["job_id"] == job.id
    view = client.get(f"/jobs/{job.id}").json()
    assert view["status"] == "succeeded" and view["attempts"] == 1


def test_a_complete_study_starts_when_it_arrived_not_at_the_next_period(
    settings: Settings, mg_study_files: list[Path]
) -> None:
    """The observer only records arrivals; a STOW request (or an association) that stored
    instances nudges housekeeping, so a study that reached its expected count does not wait
    for the period (an hour here)."""
    runtime = build_runtime(
        settings.model_copy(update={"arrival_sweep_seconds": 3600}), create=True
    )
    try:
        mg_policy(runtime, cr=20, auto_classify=True, expected_instances=4, quiet_seconds=3600)
        key = (settings.data_dir / "admin.key").read_text().strip()
        app = create_app(state=runtime)
        with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
            for path in mg_study_files:  # one STOW request per image, as some senders do
                posted = stow(client, path.read_bytes())
                assert posted.status_code == 200, posted.text
            study_uid = str(
                pydicom.dcmread(mg_study_files[0], stop_before_pixels=True).StudyInstanceUID
            )
            (result,) = results_when(client, study_uid, 1, timeout=60)
            assert result["applied_cr"] == 20 and len(result["images"]) == 4
    finally:
        runtime.close()
