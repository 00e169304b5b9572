"""Job rows: idempotent submission, claiming, heartbeats, stale-job recovery (both databases)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from services.core import jobs
from services.core.contracts import JobStatus, JobTrigger
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
        assert row.status == JobStatus.QUEUED and row.reason is None


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
