"""Thin tasks: each calls one core function. Registered by name (core/contracts.py).

Transient errors (database or broker connection) give the job back to the queue and retry with
backoff, in whichever worker process takes the retry; anything else, or a retry budget spent, or
the soft time limit, fails the job with a reason a person can act on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from services.core import jobs
from services.core.contracts import (
    QUEUE_CLASSIFY,
    TASK_CLASSIFY,
    TASK_CR_SWEEP,
    TASK_HOUSEKEEPING,
    ClassifyPayload,
    Payload,
)
from services.worker.app import celery_app, context

log = logging.getLogger(__name__)

TRANSIENT = (OperationalError, ConnectionError, TimeoutError)


class ClassifyTask(Task):  # type: ignore[misc]
    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """The task gave up (retries spent, or an unexpected error): fail the job, with why."""
        job_id = args[0] if args else kwargs.get("job_id")
        if not job_id:
            return
        what = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, TRANSIENT):
            reason = (
                f"gave up after {self.request.retries} retries ({what}); check that the "
                "database and the broker are reachable, then ask again"
            )
        else:
            reason = (
                f"internal error after {self.request.retries} retries ({what}); see the worker log"
            )
        jobs.fail(context().sessions, job_id, reason=reason)


@celery_app.task(  # type: ignore[untyped-decorator]
    name=TASK_CLASSIFY,
    base=ClassifyTask,
    autoretry_for=TRANSIENT,
    retry_backoff=True,
    retry_backoff_max=120,
    max_retries=6,
)
def classify_study(job_id: str) -> str | None:
    from services.core.classify import run_job

    ctx = context()
    limit = ctx.settings.job_soft_time_limit
    reason = (
        f"the job ran longer than {limit} s (CRGATE_JOB_SOFT_TIME_LIMIT) and was stopped; "
        "raise the limit for large studies"
    )
    started = time.monotonic()
    try:
        result = run_job(ctx, job_id)
    except SoftTimeLimitExceeded:
        jobs.fail(ctx.sessions, job_id, reason=reason)
        return None
    except TRANSIENT as exc:  # retried (autoretry_for): let any worker process take it
        _release(ctx, job_id, exc)
        raise
    if result is None and time.monotonic() - started >= limit:
        # the limit fired inside code that turned it into an error of its own (a codec's
        # broad except): the time limit is the reason a person can act on
        jobs.fail(ctx.sessions, job_id, reason=reason)
    return result


def _release(ctx: Any, job_id: str, exc: BaseException) -> None:
    try:
        jobs.release(
            ctx.sessions, job_id, reason=f"retrying after a transient error ({type(exc).__name__})"
        )
    except TRANSIENT:  # the database is the trouble: the stale-job sweep puts it back later
        log.warning("job %s: not given back to the queue (database unreachable)", job_id)


@celery_app.task(name=TASK_CR_SWEEP, acks_late=True)  # type: ignore[untyped-decorator]
def cr_sweep(sweep_id: str) -> Any:
    from services.core.sweeps import run_sweep_job

    return run_sweep_job(context(), sweep_id)


@celery_app.task(name=TASK_HOUSEKEEPING)  # type: ignore[untyped-decorator]
def housekeeping() -> list[str]:
    """The periodic pass (beat): jobs of ready studies, stale jobs sent again."""
    from services.core.arrivals import ArrivalTracker

    started: Any = ArrivalTracker(context(), _Requeue()).housekeeping()
    return list(started)


class _Requeue:
    """Housekeeping's queue inside a worker: send the classify task through this app."""

    def enqueue(self, payload: Payload) -> None:
        if isinstance(payload, ClassifyPayload):
            celery_app.send_task(TASK_CLASSIFY, args=[payload.job_id], queue=QUEUE_CLASSIFY)
        else:
            celery_app.send_task(TASK_CR_SWEEP, args=[payload.sweep_id], queue=QUEUE_CLASSIFY)
