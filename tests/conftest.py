"""Shared fixtures: a real index database (SQLite and PostgreSQL), a store, small phantom files.

PostgreSQL runs on 127.0.0.1:5432 (trust auth); each test session creates its own database
and drops it at the end; tables are emptied between tests.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from services.core.contracts import Payload
from services.core.db.engine import make_engine, migrate, session_factory
from services.core.db.tables import Base
from services.core.ingest import Ingestor
from services.core.storage import InstanceStore
from services.lab.phantom import PhantomConfig, generate_study

PG_ADMIN_URL = os.environ.get(
    "CRGATE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ("sqlite", "postgresql")
TINY = PhantomConfig(width=128, height=160)
MG = PhantomConfig(width=416, height=512)  # large enough for the classifier


class HeldQueue:
    """A job queue no worker takes from (a broker with every worker stopped): jobs asked for
    stay queued, and the payloads sent are kept for the test to read."""

    def __init__(self) -> None:
        self.payloads: list[Payload] = []

    def enqueue(self, payload: Payload) -> None:
        self.payloads.append(payload)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    name = f"crgate_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The index database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.db'}"
        return
    url: str = request.getfixturevalue("pg_url")
    yield url
    engine = make_engine(url)
    with engine.begin() as conn:
        names = ", ".join(t.name for t in reversed(Base.metadata.sorted_tables))
        conn.execute(text(f"TRUNCATE {names} CASCADE"))
    engine.dispose()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


@pytest.fixture
def store(tmp_path: Path) -> InstanceStore:
    store = InstanceStore(tmp_path / "data")
    store.ensure()
    return store


@pytest.fixture
def ingestor(store: InstanceStore, sessions: sessionmaker[Session]) -> Ingestor:
    return Ingestor(store, sessions)


@pytest.fixture(scope="session")
def tiny_study_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four small phantom mammograms of one study, as Part 10 files."""
    out = tmp_path_factory.mktemp("tiny-study")
    study = generate_study(0, seed=7, config=TINY)
    paths = []
    for view, ds in study.datasets.items():
        path = out / f"{view}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def mg_study_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("mg-study")
    study = generate_study(1, seed=4242, config=MG)
    paths = []
    for view, ds in study.datasets.items():
        ds.save_as(out / f"{view}.dcm", enforce_file_format=True)
        paths.append(out / f"{view}.dcm")
    return paths
