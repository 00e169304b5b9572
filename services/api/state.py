"""What the API process holds: settings, database, store, ingest path (built once at start)."""

from __future__ import annotations

import contextlib
import logging
import time
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

#: at start, staged files older than this (by mtime) are a crash's leftovers and are dropped;
#: younger ones may be uploads another process (api and scp run apart) is still receiving
STALE_STAGING_SECONDS = 3600.0


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
    cutoff = time.time() - STALE_STAGING_SECONDS
    for leftover in store.leftover_staging():  # never acknowledged: safe to drop
        with contextlib.suppress(FileNotFoundError):  # finished meanwhile by its process
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
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
        queue.start_housekeeping(tracker.housekeeping, settings.arrival_sweep_seconds)
    return AppState(
        settings=settings,
        engine=engine,
        sessions=sessions,
        store=store,
        ingestor=ingestor,
        job_context=job_context,
        queue=queue,
    )
