"""The Celery application: broker from settings, reliability options, per-process resources.

acks_late + reject on worker loss + prefetch 1: a task is acknowledged only after it ran, so a
worker killed mid-job leaves the message to be delivered again (tasks are idempotent by job).
One JobContext (database engine, store, ONNX session) per worker process, made at process start
by ``services.runtime``.

Nothing is read at import: ``crgate worker`` calls :func:`configure` with its settings (its
``--data-dir`` included) before the worker starts; a bare ``celery -A services.worker.app``
(the compose health check) configures the app from the environment when it first needs it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutdown

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
    Payload,
)

log = logging.getLogger(__name__)

celery_app = Celery("crgate", include=["services.worker.tasks"])  # loaded when a worker starts
_settings: Settings | None = None
_context: JobContext | None = None


def configure(settings: Settings, *, housekeeping: bool = False) -> Celery:
    """Configure the app for this worker from ``settings`` (before the worker starts);
    ``housekeeping``: this worker's main process sends the periodic pass (:class:`Ticker`)."""
    global _settings, _ticker
    _settings = settings
    celery_app.conf.update(_options(settings))
    _ticker = Ticker(settings.arrival_sweep_seconds) if housekeeping else None
    return celery_app


class Ticker:
    """Sends the housekeeping task every ``seconds`` from a thread of the worker's main process.

    Celery's embedded beat is a process of its own: killed, it stays defunct and nothing
    restarts it, so stale jobs are never sent again. This thread lives and dies with the
    process that consumes the queue: while the worker takes jobs, the pass runs (one lost send
    is logged and the next tick tries again).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="housekeeping", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            try:
                celery_app.send_task(TASK_HOUSEKEEPING, queue=QUEUE_CLASSIFY)
            except Exception as exc:  # the broker away: the next tick tries again
                log.warning("housekeeping not sent: %s", type(exc).__name__)


_ticker: Ticker | None = None


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_ticker(**_: Any) -> None:
    if _ticker is not None:
        _ticker.start()
        log.info("housekeeping every %g s from this worker", _ticker.seconds)


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_ticker(**_: Any) -> None:
    if _ticker is not None:
        _ticker.stop()


def settings() -> Settings:
    """This worker's settings: those given to :func:`configure`, else the environment's."""
    global _settings
    if _settings is None:
        _settings = Settings()
    return _settings


@celery_app.on_configure.connect  # type: ignore[untyped-decorator]
def _configure_from_environment(sender: Celery, **_: Any) -> None:
    if _settings is None:  # not started by `crgate worker` (e.g. `celery inspect ping`)
        sender.conf.update(_options(settings()))


def _options(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url or "redis://127.0.0.1:6379/0",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.job_soft_time_limit,
        "task_time_limit": settings.job_time_limit,
        "task_default_queue": QUEUE_CLASSIFY,
        "task_routes": {
            TASK_CLASSIFY: {"queue": QUEUE_CLASSIFY},
            TASK_CR_SWEEP: {"queue": QUEUE_SWEEP},
            TASK_FORWARD: {"queue": QUEUE_FORWARD},
        },
        "broker_transport_options": {"visibility_timeout": settings.broker_visibility_timeout},
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,
        "worker_hijack_root_logger": False,
    }


def context() -> JobContext:
    """This process's JobContext (made on first use if the process-init signal did not run)."""
    global _context
    if _context is None:
        _context = _build_context()
    return _context


def _build_context() -> JobContext:
    from services.runtime import build_job_context

    ctx = build_job_context(settings())
    if ctx.forward is not None:  # a job's forwards go out as tasks of their own
        ctx.forward.queue = AppQueue()
    model = ctx.settings.default_model
    classifier = ctx.classifier(model)  # the ONNX session, once per process
    log.info("model %s on %s", model, classifier.provider)
    return ctx


class AppQueue:
    """Tasks sent from inside a worker (forwards, housekeeping's jobs): through this app."""

    def enqueue(self, payload: Payload) -> None:
        from services.runtime.queue import send

        send(celery_app, payload, settings())


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _init_process(**_: Any) -> None:
    global _context
    _context = _build_context()
    log.info("worker process ready")
