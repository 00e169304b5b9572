"""Alembic migrations produce exactly the schema the code declares, on both databases."""

from __future__ import annotations

import stat
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, text

from services.core.db.engine import make_engine, migrate
from services.core.db.tables import Base


def test_migrated_schema_matches_the_tables(engine: Engine) -> None:
    migrate(engine)  # a second run is a no-op
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_the_sqlite_index_is_private(tmp_path: Path) -> None:
    """The index holds patient names and IDs: created 0600 like the instances, its WAL too, and
    an existing file left readable by others is tightened."""
    path = tmp_path / "var" / "index.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        migrate(engine)
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE probe (x INTEGER)"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        wal = path.with_name("index.db-wal")
        assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600
    finally:
        engine.dispose()
    path.chmod(0o644)
    make_engine(f"sqlite:///{path}").dispose()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
