"""Thin tasks: each calls one core function. Registered by name (core/contracts.py).

Transient errors (database or broker connection) give the job back to the queue and retry with
backoff, in whichever worker process takes the retry; anything else, or a retry budget spent, or
the soft time limit, fails the job with a reason a person can act on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from services.core import jobs
from services.core.classify import JobContext
from services.core.contracts import (
    TASK_CLASSIFY,
    TASK_CR_SWEEP,
    TASK_FORWARD,
    TASK_HOUSEKEEPING,
)
from services.worker.app import AppQueue, celery_app, context

log = logging.getLogger(__name__)

TRANSIENT = (OperationalError, ConnectionError, TimeoutError)
RETRIES: dict[str, Any] = {
    "autoretry_for": TRANSIENT,
    "retry_backoff": True,
    "retry_backoff_max": 120,
    "max_retries": 6,
}


class JobTask(Task):  # type: ignore[misc]
    """A task that runs one job row through its lifecycle (claim ... succeed or fail)."""

    lifecycle: jobs.Lifecycle[Any] = jobs.JOBS
    limit_setting = "CRGATE_JOB_SOFT_TIME_LIMIT"

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """The task gave up (retries spent, or an unexpected error): fail the job, with why."""
        job_id = args[0] if args else next(iter(kwargs.values()), None)
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
        self.lifecycle.fail(context().sessions, job_id, reason=reason)

    def run_job(self, job_id: str, runner: Callable[[JobContext, str], Any]) -> Any:
        """``runner(ctx, job_id)``, with the soft time limit and transient errors handled."""
        ctx = context()
        limit = self.request.timelimit[1] if self.request.timelimit else None
        limit = limit or ctx.settings.job_soft_time_limit
        reason = (
            f"the {self.lifecycle.noun} ran longer than {limit} s ({self.limit_setting}) and "
            "was stopped; raise the limit for large studies"
        )
        started = time.monotonic()
        try:
            result = runner(ctx, job_id)
        except SoftTimeLimitExceeded:
            self.lifecycle.fail(ctx.sessions, job_id, reason=reason)
            return None
        except TRANSIENT as exc:  # retried (autoretry_for): let any worker process take it
            self._release(ctx, job_id, exc)
            raise
        if result is None and time.monotonic() - started >= limit:
            # the limit fired inside code that turned it into an error of its own (a codec's
            # broad except): the time limit is the reason a person can act on
            self.lifecycle.fail(ctx.sessions, job_id, reason=reason)
        return result

    def _release(self, ctx: JobContext, job_id: str, exc: BaseException) -> None:
        what = f"retrying after a transient error ({type(exc).__name__})"
        try:
            self.lifecycle.release(ctx.sessions, job_id, reason=what)
        except TRANSIENT:  # the database is the trouble: housekeeping puts it back later
            log.warning("%s %s: not given back (database unreachable)", self.lifecycle.noun, job_id)


class SweepTask(JobTask):
    lifecycle = jobs.SWEEPS
    limit_setting = "CRGATE_SWEEP_TIME_LIMIT"


@celery_app.task(name=TASK_CLASSIFY, base=JobTask, bind=True, **RETRIES)  # type: ignore[untyped-decorator]
def run_classify_job(self: JobTask, job_id: str) -> str | None:
    from services.core.runner import run_job

    result: str | None = self.run_job(job_id, run_job)
    return result


@celery_app.task(name=TASK_CR_SWEEP, base=SweepTask, bind=True, **RETRIES)  # type: ignore[untyped-decorator]
def run_sweep_job(self: SweepTask, sweep_id: str) -> dict[str, Any] | None:
    from services.lab import sweeps

    result: dict[str, Any] | None = self.run_job(sweep_id, sweeps.run_sweep_job)
    return result


@celery_app.task(name=TASK_FORWARD, **RETRIES)  # type: ignore[untyped-decorator]
def forward(forward_ids: list[str]) -> dict[str, int]:
    """Send objects to a destination (rows of the forwards table): their states recorded."""
    from services.core import forwards

    return forwards.run(context(), forward_ids)


@celery_app.task(name=TASK_HOUSEKEEPING)  # type: ignore[untyped-decorator]
def housekeeping() -> list[str]:
    """The periodic pass: jobs of ready studies, stale jobs sent again, forwards due (retries,
    tasks lost) handed to the forward queue, retention."""
    from services.core import forwards
    from services.core.arrivals import ArrivalTracker
    from services.core.deletion import retention_pass

    ctx = context()
    try:
        started: Any = ArrivalTracker(ctx, AppQueue()).housekeeping()
    finally:
        try:
            forwards.housekeeping(ctx, AppQueue())
        finally:
            retention_pass(ctx.settings, ctx.sessions, ctx.store)
    return list(started)
