"""Retries with backoff of the classify task, on the real Celery app run eagerly.

Eager mode (``Task.apply``: the task body, autoretry, backoff and ``on_failure`` as a worker runs
them, in this process) because a real worker process could not be handed a database that fails
and comes back at a chosen moment; the failures themselves are real: a database server that
refuses connections, a table locked past PostgreSQL's lock_timeout.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery.signals import task_retry
from sqlalchemy import Engine, create_engine, text, update
from sqlalchemy.engine import make_url

from services.core import classify, jobs
from services.core.arrivals import ArrivalTracker
from services.core.classify import JobContext
from services.core.config import Settings
from services.core.contracts import JobStatus, JobTrigger, SweepPayload
from services.core.db.engine import make_engine
from services.core.db.tables import Sweep
from services.core.ingest import Channel
from services.core.ratio import CompressionRatio
from services.lab import sweeps
from services.runtime import build_job_context
from services.worker import app as worker_app
from services.worker.tasks import run_classify_job, run_sweep_job
from tests.conftest import HeldQueue, free_port

LOCK_TIMEOUT_MS = 200


def job_engine(database_url: str) -> Engine:
    """The worker's engine; on PostgreSQL a statement gives up on a lock after 200 ms."""
    if database_url.startswith("sqlite"):
        return make_engine(database_url)
    return create_engine(
        make_url(database_url),
        connect_args={"options": f"-c lock_timeout={LOCK_TIMEOUT_MS}"},
    )


@pytest.fixture
def ctx(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[JobContext]:
    """This process as a worker process: its JobContext (what worker_process_init makes)."""
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, threads=1)
    engine = job_engine(database_url)
    context = build_job_context(settings, create=True, engine=engine)
    monkeypatch.setattr(worker_app, "_context", context)
    yield context
    engine.dispose()


@pytest.fixture
def job_id(ctx: JobContext, mg_study_files: list[Path]) -> str:
    for path in mg_study_files:
        staged = ctx.store.new_staging_path()
        staged.write_bytes(path.read_bytes())
        study_uid = ctx.ingestor.ingest_file(staged, channel=Channel.STOW).study_uid
    job, _ = classify.request(
        ctx,
        HeldQueue(),
        study_uid,
        cr=CompressionRatio(25),
        syntax=None,
        model=None,
        trigger=JobTrigger.API,
        requested_by=None,
    )
    return job.id


@pytest.fixture
def retries() -> Iterator[list[Any]]:
    """The Retry of each retry the classify task scheduled, in order."""
    seen: list[Any] = []

    def record(sender: Any = None, reason: Any = None, **_: Any) -> None:
        seen.append(reason)

    task_retry.connect(record, sender=run_classify_job, weak=False)
    yield seen
    task_retry.disconnect(record, sender=run_classify_job)


def test_database_outage_is_retried_with_backoff_then_the_job_succeeds(
    ctx: JobContext, job_id: str, retries: list[Any]
) -> None:
    working = ctx.sessions.kw["bind"]
    refusing = make_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/gone")
    ctx.sessions.configure(bind=refusing)  # the database server is down

    def back_after_two(**_: Any) -> None:
        if len(retries) == 2:
            ctx.sessions.configure(bind=working)

    task_retry.connect(back_after_two, sender=run_classify_job, weak=False)
    try:
        outcome = run_classify_job.apply(args=[job_id])
    finally:
        task_retry.disconnect(back_after_two, sender=run_classify_job)
        ctx.sessions.configure(bind=working)
        refusing.dispose()
    assert outcome.successful(), outcome.traceback
    assert [type(r.exc).__name__ for r in retries] == ["OperationalError"] * 2
    for n, retry in enumerate(retries):  # exponential backoff with full jitter: 0..2**n s
        assert 0 <= float(retry.when) <= 2**n
    with ctx.sessions() as session:
        job = jobs.get_job(session, job_id)
        assert job.status == JobStatus.SUCCEEDED and job.result_id == outcome.result
        assert job.attempts == 1  # the runs the outage stopped never took the job


# PostgreSQL only: it needs a table lock that times out (lock_timeout); SQLite has none.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_spent_retries_fail_the_job_with_the_reason(
    ctx: JobContext, job_id: str, retries: list[Any], database_url: str
) -> None:
    engine = ctx.sessions.kw["bind"]
    with engine.connect() as maintenance:  # the study's index rows stay locked throughout
        maintenance.execute(text("LOCK TABLE instances IN ACCESS EXCLUSIVE MODE"))
        outcome = run_classify_job.apply(args=[job_id])
        maintenance.rollback()
    assert outcome.failed()
    assert len(retries) == run_classify_job.max_retries == 6
    with ctx.sessions() as session:
        job = jobs.get_job(session, job_id)
        assert job.status == JobStatus.FAILED and job.finished_at is not None
        assert job.reason is not None
        assert job.reason.startswith("gave up after 6 retries (OperationalError")
        assert "lock timeout" in job.reason
        assert "check that the database and the broker are reachable" in job.reason
        assert job.attempts == 0  # each run was given back to the queue for its retry


# --------------------------------------------------------------------------- sweeps


@pytest.fixture
def sweep_id(ctx: JobContext, mg_study_files: list[Path]) -> str:
    """A CR safety study recorded on one stored study, as `POST /studies:cr-sweep` records it."""
    for path in mg_study_files:
        staged = ctx.store.new_staging_path()
        staged.write_bytes(path.read_bytes())
        study_uid = ctx.ingestor.ingest_file(staged, channel=Channel.STOW).study_uid
    labels = [{"study_uid": study_uid, "laterality": side, "label": "normal"} for side in "LR"]
    body = sweeps.SweepRequest.model_validate(
        {"study_uids": [study_uid], "labels": labels, "crs": "1,20", "bootstrap": 100}
    )
    queue = HeldQueue()
    sweep = sweeps.request(ctx, queue, body, requested_by="test")
    assert queue.payloads == [SweepPayload(sweep_id=sweep.id)]
    return sweep.id


def sweep_row(ctx: JobContext, sweep_id: str) -> Sweep:
    with ctx.sessions() as session:
        return jobs.SWEEPS.get(session, sweep_id)


def test_a_sweep_another_live_worker_runs_is_left_alone(ctx: JobContext, sweep_id: str) -> None:
    """Before: a second delivery of the task (visibility timeout, a re-send) ran the same sweep
    again beside the first."""
    with ctx.sessions() as session, session.begin():
        session.execute(
            update(Sweep)
            .where(Sweep.id == sweep_id)
            .values(status="running", worker="elsewhere:1", attempts=1, heartbeat_at=jobs.now())
        )
    assert run_sweep_job.apply(args=[sweep_id]).result is None
    row = sweep_row(ctx, sweep_id)
    assert (row.status, row.worker, row.attempts) == ("running", "elsewhere:1", 1)


def test_a_sweep_whose_worker_died_each_time_stops_with_the_reason(
    ctx: JobContext, sweep_id: str
) -> None:
    with ctx.sessions() as session, session.begin():
        session.execute(
            update(Sweep).where(Sweep.id == sweep_id).values(attempts=jobs.MAX_ATTEMPTS)
        )
    assert run_sweep_job.apply(args=[sweep_id]).result is None
    row = sweep_row(ctx, sweep_id)
    assert row.status == "failed" and row.reason is not None
    assert row.reason.startswith(f"stopped after {jobs.MAX_ATTEMPTS} attempts")


def test_a_sweep_that_fails_unexpectedly_is_failed_with_the_reason(
    ctx: JobContext, sweep_id: str
) -> None:
    """Before: the sweep task had no on_failure; the sweep stayed 'running' for ever."""
    blocker = sweeps.sweep_dir(ctx, sweep_id)  # a file where the sweep's folder must go
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way")
    outcome = run_sweep_job.apply(args=[sweep_id])
    assert outcome.failed()
    row = sweep_row(ctx, sweep_id)
    assert row.status == "failed" and row.finished_at is not None
    assert row.reason is not None and row.reason.startswith("internal error after 0 retries (")
    assert "see the worker log" in row.reason


def test_housekeeping_sends_a_lost_sweep_again(ctx: JobContext, sweep_id: str) -> None:
    """Before: a sweep whose message was lost (broker restarted empty) stayed queued for ever."""
    queue = HeldQueue()
    ArrivalTracker(ctx, queue).housekeeping()
    assert queue.payloads == []  # queued only just now: left alone
    with ctx.sessions() as session, session.begin():
        session.execute(
            update(Sweep)
            .where(Sweep.id == sweep_id)
            .values(queued_at=jobs.now() - timedelta(minutes=5))
        )
    ArrivalTracker(ctx, queue).housekeeping()
    assert queue.payloads == [SweepPayload(sweep_id=sweep_id)]
