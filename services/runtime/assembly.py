"""Every process is put together here, from one ``Settings``.

``build_runtime`` makes what a server process holds (api, scp, serve): the index, the store,
the ingest path, the job context, the queue and the arrival tracker. ``build_job_context``
makes what a worker process holds. ``start_scp`` starts the DICOM server on a runtime's ingest
path. Nothing else constructs these; the CLI and the test fixtures call these functions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from services.core import forwards, logredact
from services.core.arrivals import ArrivalTracker
from services.core.classify import JobContext
from services.core.config import Settings
from services.core.deletion import retention_pass
from services.core.errors import Conflict
from services.core.forwards import Forwarding
from services.core.ingest import Ingestor
from services.core.retrieve.framecache import FrameCache
from services.core.storage import InstanceStore
from services.runtime.datadir import Index, open_index, open_store
from services.runtime.forwarding import ForwardTarget, sender
from services.runtime.queue import CeleryJobQueue, InProcessJobQueue
from services.scp.server import ScpServer, start_server

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a server process holds, built once at start (the API's state)."""

    settings: Settings
    engine: Engine
    job_context: JobContext
    queue: CeleryJobQueue | InProcessJobQueue
    frames: FrameCache  # decoded images the console's panes ask for again

    @property
    def sessions(self) -> sessionmaker[Session]:
        return self.job_context.sessions

    @property
    def store(self) -> InstanceStore:
        return self.job_context.store

    @property
    def ingestor(self) -> Ingestor:
        return self.job_context.ingestor

    def close(self) -> None:
        self.queue.close()
        self.engine.dispose()


def build_job_context(
    settings: Settings,
    *,
    create: bool = False,
    engine: Engine | None = None,
) -> JobContext:
    """What a job needs: the index, the store, the ingest path, the forwarder.

    ``engine`` replaces the one made from the settings (a test's engine with a lock timeout).
    """
    return _job_context(settings, open_index(settings, create=create, engine=engine))


def _job_context(settings: Settings, index: Index) -> JobContext:
    logredact.install()  # every process that reads DICOM builds one
    store = open_store(settings)
    return JobContext(
        settings=settings,
        sessions=index.sessions,
        store=store,
        ingestor=Ingestor(
            store,
            index.sessions,
            settings.duplicate_policy,
            max_inflated_bytes=settings.max_inflated_bytes,
        ),
        forward=Forwarding(
            send=sender(settings.ae_title), defaults=_forward_to(settings, index.sessions)
        ),
    )


def _forward_to(settings: Settings, sessions: sessionmaker[Session]) -> tuple[str, ...]:
    """``CRGATE_FORWARD_TO`` kept in the registry (destination ``forward-to``): its name."""
    if not settings.forward_to:
        return ()
    target = ForwardTarget.parse(settings.forward_to)
    try:
        return (forwards.ensure_destination(sessions, target.ae_title, target.host, target.port),)
    except Conflict as exc:  # another process made it at the same moment, or the AE title
        log.warning("CRGATE_FORWARD_TO %s: %s", target, exc)  # is another destination's
        return (forwards.SHORTCUT_NAME,)


def build_runtime(settings: Settings, *, create: bool = False) -> Runtime:
    """A server process: with a broker, jobs go to Celery workers; without one, they run on a
    thread of this process, which also runs the housekeeping pass and resumes unfinished jobs."""
    index = open_index(settings, create=create)
    if index.created:
        log.warning("created a new crgate data directory in %s", settings.data_dir.resolve())
    if index.key_file is not None:
        log.warning("no API key existed: created an admin key in %s (mode 0600)", index.key_file)
    ctx = _job_context(settings, index)
    queue: CeleryJobQueue | InProcessJobQueue
    if settings.broker_url:
        queue = CeleryJobQueue(settings)
    else:
        log.info("no broker configured: jobs run in this process")
        queue = InProcessJobQueue(ctx)
    if ctx.forward is not None:
        ctx.forward.queue = queue
    tracker = ArrivalTracker(ctx, queue)
    ctx.ingestor.observers.append(tracker)
    if isinstance(queue, InProcessJobQueue):
        recovered = queue.recover()
        if recovered:
            log.warning("queued %d unfinished job(s) again", len(recovered))
        queue.start_housekeeping(
            lambda: _housekeeping(tracker, ctx, queue), settings.arrival_sweep_seconds
        )
    frames = FrameCache(settings.console_cache_mb << 20)
    return Runtime(
        settings=settings, engine=index.engine, job_context=ctx, queue=queue, frames=frames
    )


def _housekeeping(tracker: ArrivalTracker, ctx: JobContext, queue: InProcessJobQueue) -> None:
    """The in-process housekeeping pass: the tracker's, then forwards due (retries, tasks lost)
    and retention (when it is due), whatever the arrivals' pass met."""
    try:
        tracker.housekeeping()
    finally:
        try:
            forwards.housekeeping(ctx, queue)
        finally:
            retention_pass(ctx.settings, ctx.sessions, ctx.store)


def start_scp(runtime: Runtime) -> ScpServer:
    """The DICOM SCP on the runtime's ingest path (OSError when the port is taken); each
    association that ends nudges housekeeping, so a complete study starts at once."""
    return start_server(runtime.settings, runtime.ingestor, on_closed=runtime.queue.nudge)
