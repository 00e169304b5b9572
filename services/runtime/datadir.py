"""The data directory and its index database: open an existing one, or create a new one.

Only ``crgate serve`` and ``crgate migrate`` create (and say so); every other command opens what
is there and stops with :class:`DataDirMissing` when nothing is, instead of leaving an empty
database wherever it happened to run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from services.core.auth import ensure_admin_key
from services.core.config import Settings
from services.core.db.engine import make_engine, migrate, session_factory
from services.core.errors import InvalidInput, OutputError
from services.core.policies import ensure_default_policy
from services.core.storage import InstanceStore

log = logging.getLogger(__name__)

#: at start, staged files older than this (by mtime) are a crash's leftovers and are dropped;
#: younger ones may be uploads another process (api and scp run apart) is still receiving
STALE_STAGING_SECONDS = 3600.0


class DataDirMissing(InvalidInput):
    """The command needs an existing data directory (index database) and found none."""


@dataclass
class Index:
    """The index database of a data directory, open."""

    engine: Engine
    sessions: sessionmaker[Session]
    created: bool  # the database was new: this call created it
    key_file: Path | None  # the first admin key, when this call created it


def describe_database(settings: Settings) -> str:
    """Where the index database is, for messages (never the password of a URL)."""
    if not settings.database_url:
        return str((settings.data_dir / "crgate.db").resolve())
    return make_url(settings.database_url).render_as_string(hide_password=True)


def index_exists(settings: Settings) -> bool:
    """Whether the data directory's index database exists and holds crgate's schema."""
    if not _file_present(settings):
        return False
    engine = make_engine(settings.effective_database_url)
    try:
        return _schema_present(engine, settings)
    finally:
        engine.dispose()


def _file_present(settings: Settings) -> bool:
    """False for a SQLite file that is not there, looked for without connecting (connecting
    would create it); True for any other database (the schema check tells)."""
    url = make_url(settings.effective_database_url)
    on_disk = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
    return not on_disk or Path(str(url.database)).is_file()


def _schema_present(engine: Engine, settings: Settings) -> bool:
    try:
        with engine.connect() as connection:
            return inspect(connection).has_table("alembic_version")
    except OperationalError as exc:
        where = describe_database(settings)
        raise OutputError(f"database {where} is unreachable: {exc.orig}") from None


def require_index(settings: Settings) -> None:
    """:class:`DataDirMissing` unless the data directory's index database exists."""
    if not index_exists(settings):
        raise _missing(settings)


def _missing(settings: Settings) -> DataDirMissing:
    return DataDirMissing(
        f"no crgate data directory at {settings.data_dir.resolve()}: its index database "
        f"({describe_database(settings)}) does not exist; pass --data-dir (or set "
        "CRGATE_DATA_DIR / CRGATE_DATABASE_URL) where crgate keeps its data, or create one "
        "with `crgate migrate` or `crgate serve`"
    )


def open_index(settings: Settings, *, create: bool, engine: Engine | None = None) -> Index:
    """Open the index (migrated to the newest schema, default policy and first admin key in
    place); with ``create`` False a missing one is :class:`DataDirMissing`."""
    file_present = _file_present(settings)
    if not file_present and not create:
        raise _missing(settings)
    owned = engine is None
    engine = engine or make_engine(settings.effective_database_url)
    existed = file_present and _schema_present(engine, settings)
    if not existed and not create:
        if owned:
            engine.dispose()
        raise _missing(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        ensure_default_policy(session, settings)
    key_file = ensure_admin_key(sessions, settings.data_dir)
    return Index(engine=engine, sessions=sessions, created=not existed, key_file=key_file)


def open_store(settings: Settings) -> InstanceStore:
    """The instance store, with the leftovers of a crashed upload dropped."""
    store = InstanceStore(settings.data_dir)
    store.ensure()
    cutoff = time.time() - STALE_STAGING_SECONDS
    for leftover in store.leftover_staging():  # never acknowledged: safe to drop
        with contextlib.suppress(FileNotFoundError):  # finished meanwhile by its process
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
    return store
