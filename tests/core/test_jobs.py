"""Job rows: idempotent submission, claiming, heartbeats, stale-job recovery (both databases)."""

from __future__ import annotations

import multiprocessing
import os
import socket
from datetime import timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from services.core import jobs
from services.core.contracts import JobStatus, JobTrigger
from services.core.db.engine import make_engine, session_factory
from services.core.db.tables import Job, Result


def request(**changes: object) -> jobs.JobRequest:
    values: dict[str, object] = {
        "study_uid": "1.2.3",
        "cr": 25.0,
        "syntax": "j2k",
        "model": "m",
        "model_sha256": "ab" * 32,
        "instance_uids": ("1.2.3.1", "1.2.3.2"),
        "policy_id": None,
        "policy_source": "requested",
        "trigger": JobTrigger.API,
    }
    values.update(changes)
    return jobs.JobRequest(**values)  # type: ignore[arg-type]


def test_same_request_gives_the_same_job(sessions: sessionmaker[Session]) -> None:
    first, created = jobs.submit(sessions, request())
    again, created_again = jobs.submit(sessions, request(instance_uids=("1.2.3.2", "1.2.3.1")))
    assert created and not created_again
    assert again.id == first.id


def test_a_late_instance_or_other_cr_makes_a_new_job(sessions: sessionmaker[Session]) -> None:
    base, _ = jobs.submit(sessions, request())
    late, created = jobs.submit(sessions, request(instance_uids=("1.2.3.1", "1.2.3.2", "1.2.3.3")))
    other_cr, created_cr = jobs.submit(sessions, request(cr=50.0))
    assert created and created_cr
    assert len({base.id, late.id, other_cr.id}) == 3


def test_failed_job_is_queued_again_when_asked_again(sessions: sessionmaker[Session]) -> None:
    job, _ = jobs.submit(sessions, request())
    assert jobs.claim(sessions, job.id, stale_after_s=60) is not None
    jobs.fail(sessions, job.id, reason="decoder missing")
    again, created = jobs.submit(sessions, request())
    assert created and again.id == job.id
    with sessions() as s:
        row = jobs.get_job(s, job.id)
        assert row.status == JobStatus.QUEUED and row.reason is None and row.attempts == 0


def test_claim_skips_succeeded_and_live_jobs(sessions: sessionmaker[Session]) -> None:
    job, _ = jobs.submit(sessions, request())
    claimed = jobs.claim(sessions, job.id, stale_after_s=60)
    assert claimed is not None and claimed.attempts == 1
    with sessions() as s, s.begin():  # pretend another worker holds it, beating
        s.execute(update(Job).where(Job.id == job.id).values(worker="other:1"))
    assert jobs.claim(sessions, job.id, stale_after_s=60) is None
    jobs.succeed(
        sessions, job.id, result=Result(id="r1", job_id=job.id, study_uid="1.2.3", payload={})
    )
    assert jobs.claim(sessions, job.id, stale_after_s=0.001) is None
    with sessions() as s:
        row = jobs.get_job(s, job.id)
        assert row.status == JobStatus.SUCCEEDED and row.result_id == "r1"
        assert row.progress_done == row.progress_total == 2


def test_stale_running_jobs_are_requeued(sessions: sessionmaker[Session]) -> None:
    job, _ = jobs.submit(sessions, request())
    jobs.claim(sessions, job.id, stale_after_s=60)
    assert jobs.stale_jobs(sessions, older_than_s=60) == []
    with sessions() as s, s.begin():
        s.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(heartbeat_at=jobs.now() - timedelta(minutes=5), worker="dead:1")
        )
    assert jobs.stale_jobs(sessions, older_than_s=60) == [job.id]
    with sessions() as s:
        row = jobs.get_job(s, job.id)
        assert row.status == JobStatus.QUEUED and "dead:1" in (row.reason or "")
    assert jobs.claim(sessions, job.id, stale_after_s=60) is not None


def test_a_job_stores_its_instance_set(sessions: sessionmaker[Session]) -> None:
    job, _ = jobs.submit(sessions, request(instance_uids=("1.2.3.2", "1.2.3.1")))
    with sessions() as s:
        assert jobs.get_job(s, job.id).instance_uids == ["1.2.3.2", "1.2.3.1"]


def test_claim_skips_a_failed_job(sessions: sessionmaker[Session]) -> None:
    """A message delivered again for a job that failed does not run it (asking again does)."""
    job, _ = jobs.submit(sessions, request())
    jobs.claim(sessions, job.id, stale_after_s=60)
    jobs.fail(sessions, job.id, reason="corrupt image")
    assert jobs.claim(sessions, job.id, stale_after_s=60) is None
    with sessions() as s:
        assert jobs.get_job(s, job.id).status == JobStatus.FAILED


def test_a_job_whose_worker_dies_every_time_stops_after_max_attempts(
    sessions: sessionmaker[Session],
) -> None:
    job, _ = jobs.submit(sessions, request())
    for attempt in range(1, jobs.MAX_ATTEMPTS + 1):
        claimed = jobs.claim(sessions, job.id, stale_after_s=60)
        assert claimed is not None and claimed.attempts == attempt
        with sessions() as s, s.begin():  # killed at the hard time limit: no more beats
            s.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(heartbeat_at=jobs.now() - timedelta(minutes=5), worker="dead:1")
            )
        assert jobs.stale_jobs(sessions, older_than_s=60) == [job.id]
    assert jobs.claim(sessions, job.id, stale_after_s=60) is None
    with sessions() as s:
        row = jobs.get_job(s, job.id)
        assert row.status == JobStatus.FAILED and row.finished_at is not None
        assert row.reason is not None
        assert row.reason.startswith(f"stopped after {jobs.MAX_ATTEMPTS} attempts")
        assert "see the worker log" in row.reason
    assert jobs.stale_jobs(sessions, older_than_s=0) == []  # never requeued again
    again, created = jobs.submit(sessions, request())  # asking again starts afresh
    assert created and again.id == job.id
    claimed = jobs.claim(sessions, job.id, stale_after_s=60)
    assert claimed is not None and claimed.attempts == 1


def test_a_released_job_is_claimed_elsewhere_and_the_run_does_not_count(
    sessions: sessionmaker[Session],
) -> None:
    job, _ = jobs.submit(sessions, request())
    assert jobs.claim(sessions, job.id, stale_after_s=60) is not None
    jobs.release(sessions, job.id, reason="retrying after a transient error (OperationalError)")
    with sessions() as s:
        row = jobs.get_job(s, job.id)
        assert row.status == JobStatus.QUEUED and row.attempts == 0
        assert "transient" in (row.reason or "")
    with sessions() as s, s.begin():  # the retry lands in another worker process
        s.execute(update(Job).where(Job.id == job.id).values(worker="other:2"))
    claimed = jobs.claim(sessions, job.id, stale_after_s=60)
    assert claimed is not None and claimed.attempts == 1


def test_release_leaves_a_job_another_worker_runs(sessions: sessionmaker[Session]) -> None:
    job, _ = jobs.submit(sessions, request())
    jobs.claim(sessions, job.id, stale_after_s=60)
    with sessions() as s, s.begin():
        s.execute(update(Job).where(Job.id == job.id).values(worker="other:2"))
    jobs.release(sessions, job.id, reason="transient")
    with sessions() as s:
        row = jobs.get_job(s, job.id)
        assert row.status == JobStatus.RUNNING and row.attempts == 1


def test_jobs_queued_too_long_are_sent_again_once_per_period(
    sessions: sessionmaker[Session],
) -> None:
    """Sending the task failed (broker down) or its message was lost: the sweep resends it."""
    job, _ = jobs.submit(sessions, request())
    fresh, _ = jobs.submit(sessions, request(cr=50.0))
    assert jobs.stale_jobs(sessions, older_than_s=60) == []
    with sessions() as s, s.begin():
        s.execute(
            update(Job).where(Job.id == job.id).values(queued_at=jobs.now() - timedelta(minutes=5))
        )
    assert jobs.stale_jobs(sessions, older_than_s=60) == [job.id]
    assert jobs.stale_jobs(sessions, older_than_s=60) == []  # not again until another minute
    with sessions() as s:
        assert jobs.get_job(s, job.id).status == JobStatus.QUEUED
        assert jobs.get_job(s, fresh.id).status == JobStatus.QUEUED


def _claim_in_child(database_url: str, job_id: str, answers: Any) -> None:
    """In a forked process (a prefork pool child): try to claim the job."""
    engine = make_engine(database_url)
    try:
        claimed = jobs.claim(session_factory(engine), job_id, stale_after_s=60)
        answers.put((jobs.worker_name(), claimed is not None))
    finally:
        engine.dispose()


def test_worker_name_is_read_at_claim_time(
    sessions: sessionmaker[Session], database_url: str
) -> None:
    """Forked children each have their own name: a child does not take over a sibling's job."""
    job, _ = jobs.submit(sessions, request())
    jobs.claim(sessions, job.id, stale_after_s=60)
    with sessions() as s:
        assert jobs.get_job(s, job.id).worker == f"{socket.gethostname()}:{os.getpid()}"
    fork = multiprocessing.get_context("fork")
    answers = fork.Queue()
    child = fork.Process(target=_claim_in_child, args=(database_url, job.id, answers))
    child.start()
    name, took_it = answers.get(timeout=60)
    child.join(60)
    assert name == f"{socket.gethostname()}:{child.pid}"
    assert not took_it  # this process still beats for the job
    with sessions() as s:
        assert jobs.get_job(s, job.id).worker == f"{socket.gethostname()}:{os.getpid()}"
