"""Job queues for producers (API, SCP, CLI): Celery by task name, or a thread in this process.

Producers never import task code: the Celery queue sends ``contracts.TASK_CLASSIFY`` by name;
the in-process queue (no broker configured: `crgate serve` on one machine) runs the same task
body, ``core.runner.run_job``, on a background thread.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from services.core import forwards, jobs
from services.core.classify import JobContext
from services.core.config import Settings
from services.core.contracts import (
    QUEUE_CLASSIFY,
    QUEUE_FORWARD,
    QUEUE_SWEEP,
    TASK_CLASSIFY,
    TASK_CR_SWEEP,
    TASK_FORWARD,
    TASK_HOUSEKEEPING,
    ClassifyPayload,
    ForwardPayload,
    JobStatus,
    Payload,
    SweepPayload,
)
from services.core.db.tables import Job, Sweep
from services.core.runner import run_job

log = logging.getLogger(__name__)

HARD_LIMIT_GRACE_SECONDS = 600  # after the soft limit, before the worker process is killed


def send(app: Any, payload: Payload, settings: Settings) -> None:
    """Send ``payload``'s task by name through the Celery ``app``, each kind on its own queue (a
    sweep runs for hours: it has a time limit of its own); ConnectionError when the broker does
    not take it."""
    from kombu.exceptions import OperationalError

    try:
        if isinstance(payload, SweepPayload):
            app.send_task(
                TASK_CR_SWEEP,
                args=[payload.sweep_id],
                queue=QUEUE_SWEEP,
                soft_time_limit=settings.sweep_time_limit,
                time_limit=settings.sweep_time_limit + HARD_LIMIT_GRACE_SECONDS,
            )
        elif isinstance(payload, ForwardPayload):
            app.send_task(TASK_FORWARD, args=[payload.forward_ids], queue=QUEUE_FORWARD)
        else:
            app.send_task(TASK_CLASSIFY, args=[payload.job_id], queue=QUEUE_CLASSIFY)
    except OperationalError as exc:
        raise ConnectionError(f"the broker did not take the task: {exc}") from exc


class CeleryJobQueue:
    def __init__(self, settings: Settings) -> None:
        from celery import Celery

        self.settings = settings
        self.app = Celery("crgate-producer", broker=settings.broker_url)
        self.app.conf.broker_connection_retry_on_startup = True
        self.app.conf.broker_transport_options = {
            "visibility_timeout": settings.broker_visibility_timeout
        }

    def enqueue(self, payload: Payload) -> None:
        send(self.app, payload, self.settings)

    def nudge(self) -> None:
        """Instances arrived (an association or a STOW request ended): ask a worker for a
        housekeeping pass now; best effort (the beat runs one soon anyway)."""
        from kombu.exceptions import OperationalError

        try:
            self.app.send_task(TASK_HOUSEKEEPING, queue=QUEUE_CLASSIFY)
        except OperationalError as exc:
            log.warning("housekeeping not asked for (%s); the beat runs it", type(exc).__name__)

    def close(self) -> None:
        self.app.close()


class InProcessJobQueue:
    """One worker thread in this process for jobs, one for forwards (a slow PACS never holds
    up a job); jobs left queued or running by a previous run of the process are picked up
    again at start, forwards by the housekeeping pass."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crgate-job")
        self.forwarder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crgate-forward")
        self._stop = threading.Event()
        self._wake = threading.Event()

    def enqueue(self, payload: Payload) -> None:
        if isinstance(payload, SweepPayload):
            self.executor.submit(self._run_sweep, payload.sweep_id)
        elif isinstance(payload, ForwardPayload):
            self.forwarder.submit(self._forward, payload.forward_ids)
        else:
            self.executor.submit(self._run, payload.job_id)

    def _run_sweep(self, sweep_id: str) -> None:
        from services.lab.sweeps import run_sweep_job

        try:
            run_sweep_job(self.ctx, sweep_id)
        except Exception:
            log.exception("sweep %s: unexpected error", sweep_id)

    def _forward(self, forward_ids: list[str]) -> None:
        try:
            forwards.run(self.ctx, forward_ids)
        except Exception:  # the rows stay claimed: housekeeping tries them again
            log.exception("forwarding %d object(s): unexpected error", len(forward_ids))

    def _run(self, job_id: str) -> None:
        try:
            run_job(self.ctx, job_id)
        except Exception as exc:
            log.exception("job %s: unexpected error", job_id)
            jobs.fail(self.ctx.sessions, job_id, reason=f"internal error ({type(exc).__name__})")

    def recover(self) -> list[str]:
        """Queue again the jobs and sweeps a stopped process left unfinished (nothing
        acknowledged is lost)."""
        from sqlalchemy import select

        unfinished = [JobStatus.QUEUED.value, JobStatus.RUNNING.value]
        with self.ctx.sessions() as session:
            job_ids = session.scalars(select(Job.id).where(Job.status.in_(unfinished))).all()
            sweep_ids = session.scalars(select(Sweep.id).where(Sweep.status.in_(unfinished))).all()
        for job_id in job_ids:
            self.enqueue(ClassifyPayload(job_id=job_id))
        for sweep_id in sweep_ids:
            self.enqueue(SweepPayload(sweep_id=sweep_id))
        return [*job_ids, *sweep_ids]

    def start_housekeeping(self, housekeeping: Any, every_s: float) -> None:
        """Run the housekeeping pass every ``every_s`` seconds, and soon after a nudge."""

        def loop() -> None:
            while not self._stop.is_set():
                self._wake.wait(every_s)
                self._wake.clear()
                if self._stop.is_set():
                    return
                try:
                    housekeeping()
                except Exception:
                    log.exception("housekeeping failed")

        threading.Thread(target=loop, name="crgate-housekeeping", daemon=True).start()

    def nudge(self) -> None:
        """Instances arrived (an association or a STOW request ended): run housekeeping now, so
        that a study that reached its expected count does not wait for the next period."""
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self.executor.shutdown(wait=True, cancel_futures=False)
        self.forwarder.shutdown(wait=True, cancel_futures=True)  # queued rows stay queued


def producer_queue(settings: Settings) -> CeleryJobQueue | None:
    """The queue a one-off command (the CLI) hands tasks to: Celery when a broker is set; else
    None, and what it records waits for the serve process's housekeeping pass."""
    return CeleryJobQueue(settings) if settings.broker_url else None
