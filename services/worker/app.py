"""The Celery application: broker from settings, reliability options, per-process resources.

acks_late + reject on worker loss + prefetch 1: a task is acknowledged only after it ran, so a
worker killed mid-job leaves the message to be delivered again (tasks are idempotent by job).
One JobContext (database engine, store, ONNX session) per worker process, made at process start.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from services.core.classify import JobContext
from services.core.config import get_settings
from services.core.contracts import QUEUE_CLASSIFY, TASK_CLASSIFY, TASK_HOUSEKEEPING

log = logging.getLogger(__name__)

settings = get_settings()
celery_app = Celery("crgate", broker=settings.broker_url or "redis://127.0.0.1:6379/0")
celery_app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_soft_time_limit=settings.job_soft_time_limit,
    task_time_limit=settings.job_time_limit,
    task_default_queue=QUEUE_CLASSIFY,
    task_routes={TASK_CLASSIFY: {"queue": QUEUE_CLASSIFY}},
    broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout},
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    beat_schedule={
        "housekeeping": {
            "task": TASK_HOUSEKEEPING,
            "schedule": settings.arrival_sweep_seconds,
        }
    },
)

_context: JobContext | None = None


def context() -> JobContext:
    """This process's JobContext (made on first use if the process-init signal did not run)."""
    global _context
    if _context is None:
        _context = build_context()
    return _context


def build_context() -> JobContext:
    from services.core.db.engine import make_engine, migrate, session_factory
    from services.core.ingest import Ingestor
    from services.core.storage import InstanceStore

    store = InstanceStore(settings.data_dir)
    store.ensure()
    engine = make_engine(settings.effective_database_url)
    migrate(engine)
    sessions = session_factory(engine)
    from services.core.policies import ensure_default_policy

    with sessions.begin() as session:
        ensure_default_policy(session, settings)
    forward = None
    if settings.forward_to:
        from services.forwarding import DicomForwarder

        forward = DicomForwarder(settings.forward_to, settings.ae_title)
    ctx = JobContext(
        settings=settings,
        sessions=sessions,
        store=store,
        ingestor=Ingestor(store, sessions, settings.duplicate_policy),
        forward=forward,
    )
    classifier = ctx.classifier(settings.default_model)  # the ONNX session, once per process
    log.info("model %s on %s", settings.default_model, classifier.provider)
    return ctx


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _init_process(**_: Any) -> None:
    global _context
    _context = build_context()
    log.info("worker process ready")


from services.worker import tasks  # noqa: E402,F401  (registers the tasks)
