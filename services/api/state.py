"""What the API process holds: settings, database, store, ingest path (built once at start)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from services.core.arrivals import ArrivalTracker
from services.core.auth import ensure_admin_key
from services.core.classify import JobContext
from services.core.config import Settings
from services.core.db.engine import make_engine, migrate, session_factory
from services.core.ingest import Ingestor
from services.core.policies import ensure_default_policy
from services.core.storage import InstanceStore
from services.forwarding import DicomForwarder
from services.queue import CeleryJobQueue, InProcessJobQueue

log = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: InstanceStore
    ingestor: Ingestor
    job_context: JobContext
    queue: CeleryJobQueue | InProcessJobQueue

    def close(self) -> None:
        self.queue.close()
        self.engine.dispose()


def build_state(settings: Settings) -> AppState:
    """Open the database (migrating it), prepare the store, create the first admin key."""
    store = InstanceStore(settings.data_dir)
    store.ensure()
    for leftover in store.leftover_staging():  # never acknowledged: safe to drop
        leftover.unlink(missing_ok=True)
    engine = make_engine(settings.effective_database_url)
    migrate(engine)
    sessions = session_factory(engine)
    key_file = ensure_admin_key(sessions, settings.data_dir)
    if key_file is not None:
        log.warning("no API key existed: created an admin key in %s (mode 0600)", key_file)
    with sessions.begin() as session:
        ensure_default_policy(session, settings)
    ingestor = Ingestor(store, sessions, settings.duplicate_policy)
    job_context = JobContext(
        settings=settings,
        sessions=sessions,
        store=store,
        ingestor=ingestor,
        forward=DicomForwarder(settings.forward_to, settings.ae_title)
        if settings.forward_to
        else None,
    )
    queue: CeleryJobQueue | InProcessJobQueue
    if settings.broker_url:
        queue = CeleryJobQueue(settings)
    else:
        log.info("no broker configured: jobs run in this process")
        queue = InProcessJobQueue(job_context)
    tracker = ArrivalTracker(job_context, queue)
    ingestor.observers.append(tracker)
    if isinstance(queue, InProcessJobQueue):
        recovered = queue.recover()
        if recovered:
            log.warning("queued %d unfinished job(s) again", len(recovered))
        queue.start_sweeper(tracker.sweep, settings.arrival_sweep_seconds)
    return AppState(
        settings=settings,
        engine=engine,
        sessions=sessions,
        store=store,
        ingestor=ingestor,
        job_context=job_context,
        queue=queue,
    )
