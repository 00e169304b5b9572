"""Job rows: create (idempotently), claim, heartbeat, progress, finish, and requeue the stale.

A job's idempotency key is (study, CR, syntax, model sha256, the study's instance set): asking
twice gives the same job; an instance arriving later makes a new key, hence a new result. The
instance set is stored with the job: the job classifies exactly those instances.

``attempts`` counts the runs a worker took the job for and did not give back: a run stopped by
a transient error (database, broker) is given back (:func:`release`) and retried; a run whose
worker died is not, so a job that kills its worker every time stops after ``MAX_ATTEMPTS``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from services.core.contracts import JobKind, JobQueue, JobStatus, JobTrigger, Payload
from services.core.db.tables import Job, Result, Sweep
from services.core.errors import NotFound

MAX_ATTEMPTS = 5  # runs whose worker died (killed at the time limit) before the job fails
HEARTBEAT_SECONDS = 5.0

log = logging.getLogger(__name__)


def worker_name() -> str:
    """This process as a job's worker: host and pid, read now (prefork children differ)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class JobRequest:
    study_uid: str
    cr: float
    syntax: str
    model: str
    model_sha256: str
    instance_uids: tuple[str, ...]
    policy_id: int | None
    policy_source: str
    trigger: JobTrigger
    requested_cr: float | None = None
    requested_by: str | None = None
    kind: JobKind = JobKind.CLASSIFY
    options: dict[str, Any] | None = None  # compress jobs: keep_copy, forward_to, forward_what

    @property
    def idempotency_key(self) -> str:
        parts = [self.study_uid, f"{self.cr:.6g}", self.syntax, self.model_sha256]
        if self.kind is not JobKind.CLASSIFY or self.options:  # plain classify keys as before
            parts += [self.kind.value, json.dumps(self.options, sort_keys=True)]
        parts.extend(sorted(self.instance_uids))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


def now() -> datetime:
    return datetime.now(UTC)


def submit(sessions: sessionmaker[Session], request: JobRequest) -> tuple[Job, bool]:
    """The job for ``request``: an existing one (False) or a new queued one (True).

    A failed job with the same key is queued again (True): asking again is how users retry.
    """
    key = request.idempotency_key
    with sessions() as session, session.begin():
        existing = session.scalars(select(Job).where(Job.idempotency_key == key)).first()
        if existing is not None:
            if existing.status != JobStatus.FAILED:
                return existing, False
            existing.status = JobStatus.QUEUED
            existing.reason = None
            existing.progress_done = 0
            existing.attempts = 0
            existing.finished_at = None
            existing.queued_at = now()
            return existing, True
    job = Job(
        id=str(uuid.uuid4()),
        kind=request.kind.value,
        options=request.options,
        idempotency_key=key,
        study_uid=request.study_uid,
        cr=request.cr,
        syntax=request.syntax,
        model=request.model,
        model_sha256=request.model_sha256,
        requested_cr=request.requested_cr,
        policy_id=request.policy_id,
        policy_source=request.policy_source,
        trigger=request.trigger.value,
        status=JobStatus.QUEUED.value,
        progress_done=0,
        progress_total=len(request.instance_uids),
        attempts=0,
        requested_by=request.requested_by,
        instance_uids=list(request.instance_uids),
        queued_at=now(),
    )
    try:
        with sessions() as session, session.begin():
            session.add(job)
    except IntegrityError:  # the same request raced us: theirs wins
        with sessions() as session:
            found = session.scalars(select(Job).where(Job.idempotency_key == key)).one()
            return found, False
    return job, True


Row = TypeVar("Row", Job, Sweep)


class Lifecycle(Generic[Row]):
    """Claim, heartbeat, give back, fail and re-send: one lifecycle for every kind of job.

    ``JOBS`` runs it on classification jobs, ``SWEEPS`` on CR safety studies run as jobs; the
    module's functions below are ``JOBS``'s.
    """

    def __init__(self, table: type[Row], noun: str) -> None:
        self.table: type[Row] = table
        self.noun = noun

    def get(self, session: Session, job_id: str, *, for_update: bool = False) -> Row:
        row: Row | None = session.get(self.table, job_id, with_for_update=for_update)
        if row is None:
            raise NotFound(f"no {self.noun} {job_id!r}")
        return row

    def claim(
        self, sessions: sessionmaker[Session], job_id: str, *, stale_after_s: float
    ) -> Row | None:
        """Mark the job as running by this worker; None if it is finished, another live worker
        runs it (its heartbeat is younger than ``stale_after_s``), or it used up its attempts
        (then it is failed with the reason)."""
        worker = worker_name()
        with sessions() as session, session.begin():
            job = self.get(session, job_id, for_update=True)
            if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
                return None
            beat = job.heartbeat_at
            if beat is not None and beat.tzinfo is None:  # SQLite gives naive datetimes
                beat = beat.replace(tzinfo=UTC)
            if (
                job.status == JobStatus.RUNNING
                and job.worker != worker
                and beat is not None
                and now() - beat < timedelta(seconds=stale_after_s)
            ):
                return None
            if job.attempts >= MAX_ATTEMPTS:
                job.status = JobStatus.FAILED.value
                job.reason = (
                    f"stopped after {job.attempts} attempts: the worker died or hit the time limit "
                    "each time (CRGATE_JOB_TIME_LIMIT); see the worker log, then ask again"
                )
                job.finished_at = now()
                return None
            job.status = JobStatus.RUNNING.value
            job.attempts += 1
            job.started_at = now()
            job.heartbeat_at = now()
            job.worker = worker
            job.reason = None
            return job

    def release(self, sessions: sessionmaker[Session], job_id: str, *, reason: str) -> None:
        """Give the job this worker runs back to the queue after a transient error, so that its
        retry may run in any worker process; the run does not count as an attempt."""
        table = self.table
        with sessions() as session, session.begin():
            session.execute(
                update(table)
                .where(
                    table.id == job_id,
                    table.status == JobStatus.RUNNING.value,
                    table.worker == worker_name(),
                )
                .values(
                    status=JobStatus.QUEUED.value,
                    attempts=table.attempts - 1,
                    reason=reason[:2000],
                    queued_at=now(),
                )
            )

    def heartbeat(
        self,
        sessions: sessionmaker[Session],
        job_id: str,
        *,
        done: int | None = None,
        **more: object,
    ) -> None:
        values: dict[str, object] = {"heartbeat_at": now(), **more}
        if done is not None:
            values["progress_done"] = done
        with sessions() as session, session.begin():
            session.execute(update(self.table).where(self.table.id == job_id).values(**values))

    @contextmanager
    def beating(
        self, sessions: sessionmaker[Session], job_id: str
    ) -> Iterator[Callable[[int, int], None]]:
        """Heartbeat every few seconds while the job runs (a long step included), so that the
        re-send of stale jobs leaves it alone; yields a progress callback (done, total)."""
        stop = threading.Event()
        done: list[int | None] = [None]  # None: no progress reported yet, only beat

        def beat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                try:
                    self.heartbeat(sessions, job_id, done=done[0])
                except Exception:  # a missed beat is not worth failing the job for
                    log.debug("%s %s: heartbeat failed", self.noun, job_id, exc_info=True)

        thread = threading.Thread(target=beat, name=f"heartbeat-{job_id[:8]}", daemon=True)
        thread.start()

        def progress(finished: int, _total: int) -> None:
            done[0] = finished
            self.heartbeat(sessions, job_id, done=finished)

        try:
            yield progress
        finally:
            stop.set()
            thread.join()

    def fail(self, sessions: sessionmaker[Session], job_id: str, *, reason: str) -> None:
        with sessions() as session, session.begin():
            session.execute(
                update(self.table)
                .where(self.table.id == job_id)
                .values(status=JobStatus.FAILED.value, reason=reason[:2000], finished_at=now())
            )

    def stale(self, sessions: sessionmaker[Session], *, older_than_s: float) -> list[str]:
        """Jobs to send to the queue again: running jobs whose worker stopped beating (killed,
        machine lost), put back in the queue, and jobs queued longer than ``older_than_s`` (their
        message was lost, or sending it failed). A duplicate message is harmless: the claim
        skips a job that is finished or that a live worker runs."""
        table = self.table
        cutoff = now() - timedelta(seconds=older_than_s)
        with sessions() as session, session.begin():
            dead: Sequence[Row] = session.scalars(
                select(table).where(
                    table.status == JobStatus.RUNNING.value, table.heartbeat_at < cutoff
                )
            ).all()
            for job in dead:
                job.status = JobStatus.QUEUED.value
                job.reason = f"requeued: worker {job.worker} stopped responding"
                job.queued_at = now()
            waiting: Sequence[Row] = session.scalars(
                select(table).where(
                    table.status == JobStatus.QUEUED.value,
                    func.coalesce(table.queued_at, table.created_at) < cutoff,
                )
            ).all()
            for job in waiting:
                job.queued_at = now()  # sent again now; again after another older_than_s
            return [job.id for job in [*dead, *waiting]]


JOBS = Lifecycle(Job, "job")
SWEEPS = Lifecycle(Sweep, "sweep")

claim = JOBS.claim
release = JOBS.release
heartbeat = JOBS.heartbeat
fail = JOBS.fail
stale_jobs = JOBS.stale


def hand_over(queue: JobQueue, payload: Payload, what: str) -> None:
    """Give a recorded job to the queue. A queue that cannot take it (broker down) leaves it
    recorded as queued: the housekeeping pass sends it again, so the request is still answered."""
    try:
        queue.enqueue(payload)
    except (ConnectionError, OSError) as exc:
        log.warning(
            "%s recorded but not sent (%s): the housekeeping pass sends it again",
            what,
            type(exc).__name__,
        )


def get_job(session: Session, job_id: str) -> Job:
    return JOBS.get(session, job_id)


def succeed(sessions: sessionmaker[Session], job_id: str, *, result: Result) -> None:
    with sessions() as session, session.begin():
        session.add(result)
        session.flush()
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status=JobStatus.SUCCEEDED.value,
                result_id=result.id,
                finished_at=now(),
                progress_done=Job.progress_total,
            )
        )


def results_of(session: Session, study_uid: str) -> list[Result]:
    return list(
        session.scalars(
            select(Result).where(Result.study_uid == study_uid).order_by(Result.created_at.desc())
        )
    )
