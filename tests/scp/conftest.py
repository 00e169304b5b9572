"""SCP fixtures: crgate's SCP started in-process on a free port, on the shared ingest fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services.core.config import Settings
from services.core.db.tables import Instance
from services.core.ingest import Ingestor
from services.core.storage import InstanceStore
from services.scp.server import ScpServer, start_server
from tests.conftest import free_port

StartScp = Callable[..., ScpServer]


@pytest.fixture
def start_scp(ingestor: Ingestor, tmp_path: Path) -> Iterator[StartScp]:
    """Start crgate's SCP on 127.0.0.1 with settings overrides; stopped after the test."""
    servers: list[ScpServer] = []

    def start(**overrides: Any) -> ScpServer:
        settings = Settings(data_dir=tmp_path / "data", dicom_port=free_port(), **overrides)
        server = start_server(settings, ingestor, host="127.0.0.1")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown(drain_seconds=5)


@pytest.fixture
def scp(start_scp: StartScp) -> ScpServer:
    return start_scp()


def stored_rows(sessions: sessionmaker[Session]) -> list[Instance]:
    with sessions() as session:
        return list(session.scalars(select(Instance)))


def store_files(store: InstanceStore, under: str) -> list[Path]:
    root = store.root / under
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
