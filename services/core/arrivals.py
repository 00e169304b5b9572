"""Study arrival: when is a study ready, and auto-classification of ready studies.

Instances are grouped by Study Instance UID. A study is ready when its policy's expected
instance count is reached, or after the policy's quiet period with no new instance (checked by
``sweep``), or when classify is called. With ``auto_classify`` a ready study is classified at the
policy's CR. A late instance changes the study's instance set, hence the job's idempotency key:
it makes a new job and a new result, never a changed old one.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from services.core import jobs
from services.core.classify import (
    CLASSIFIABLE_MODALITY,
    JobContext,
    prepare,
    resolve_study_policy,
)
from services.core.contracts import ClassifyPayload, JobQueue, JobTrigger
from services.core.db.repository import insert_ignore
from services.core.db.tables import StudyArrival
from services.core.errors import CrgateError
from services.core.ingest import Channel, IngestResult, Outcome

log = logging.getLogger(__name__)


def record_arrival(sessions: sessionmaker[Session], study_uid: str) -> tuple[int, int]:
    """Count one more instance of the study; safe when instances arrive in parallel.

    Returns (instances so far, instances at the last auto-classification).
    """
    with sessions() as session, session.begin():
        insert_ignore(
            session,
            StudyArrival.__table__,
            {
                "study_uid": study_uid,
                "instance_count": 0,
                "classified_count": 0,
                "last_arrival": datetime.now(UTC),
            },
        )
        session.execute(
            update(StudyArrival)
            .where(StudyArrival.study_uid == study_uid)
            .values(instance_count=StudyArrival.instance_count + 1, last_arrival=datetime.now(UTC))
        )
        row = session.execute(
            select(StudyArrival.instance_count, StudyArrival.classified_count).where(
                StudyArrival.study_uid == study_uid
            )
        ).one()
        return int(row[0]), int(row[1])


class ArrivalTracker:
    """Called by the ingest path after each stored instance; enqueues ready studies."""

    def __init__(self, ctx: JobContext, queue: JobQueue) -> None:
        self.ctx = ctx
        self.queue = queue

    def __call__(self, result: IngestResult, channel: Channel) -> None:
        if channel is Channel.WORKER or result.outcome is Outcome.DUPLICATE:
            return
        count, classified = record_arrival(self.ctx.sessions, result.study_uid)
        self._maybe_classify(result.study_uid, count, classified)

    def sweep(self) -> list[str]:
        """Classify quiet studies (auto policies); send again jobs whose worker died and jobs
        queued too long (their message was lost, or sending it failed)."""
        started: list[str] = []
        for job_id in jobs.stale_jobs(
            self.ctx.sessions, older_than_s=self.ctx.settings.job_stale_seconds
        ):
            log.warning("job %s: worker stopped responding or message lost; sent again", job_id)
            self.queue.enqueue(ClassifyPayload(job_id=job_id))
        with self.ctx.sessions() as session:
            pending = session.scalars(
                select(StudyArrival).where(
                    StudyArrival.instance_count > StudyArrival.classified_count
                )
            ).all()
            waiting = [
                (r.study_uid, r.instance_count, r.classified_count, r.last_arrival) for r in pending
            ]
        for study_uid, count, classified, last in waiting:
            last = last if last.tzinfo else last.replace(tzinfo=UTC)
            queued = self._maybe_classify(study_uid, count, classified, last_arrival=last)
            if queued:
                started.append(queued)
        return started

    def _maybe_classify(
        self,
        study_uid: str,
        count: int,
        classified: int,
        *,
        last_arrival: datetime | None = None,
    ) -> str | None:
        if count <= classified:
            return None
        try:
            request = prepare(
                self.ctx,
                study_uid,
                cr=None,
                syntax=None,
                model=None,
                trigger=JobTrigger.ARRIVAL,
                requested_by="arrival",
            )
        except CrgateError as exc:  # not a mammography study, no policy...: nothing to do
            log.debug("study %s not auto-classified: %s", study_uid, exc)
            return None
        policy = self._policy(study_uid)
        if policy is None or not policy.auto_classify:
            return None
        expected = policy.expected_instances
        ready = expected is not None and count >= expected
        if not ready and last_arrival is not None:
            ready = datetime.now(UTC) - last_arrival >= timedelta(seconds=policy.quiet_seconds)
        if not ready:
            return None
        job, created = jobs.submit(self.ctx.sessions, request)
        with self.ctx.sessions() as session, session.begin():
            row = session.get(StudyArrival, study_uid)
            if row is not None:
                row.classified_count = max(row.classified_count, count)
        if created:
            log.info("study %s ready (%d instances): job %s queued", study_uid, count, job.id)
            self.queue.enqueue(ClassifyPayload(job_id=job.id))
        return job.id

    def _policy(self, study_uid: str) -> Any:
        with self.ctx.sessions() as session:
            try:
                return resolve_study_policy(session, study_uid, self.ctx.store)
            except CrgateError:
                return None


__all__ = ["CLASSIFIABLE_MODALITY", "ArrivalTracker"]
