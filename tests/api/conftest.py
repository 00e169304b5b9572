"""API fixtures: the real app on a real database (SQLite and PostgreSQL) and a real store.

``client`` is an in-process TestClient carrying an admin key; ``live_url`` is the same app served
by uvicorn on a free port, for clients that need a socket (dicomweb-client).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.core.auth import Role, create_key
from services.core.config import Settings
from services.core.ingest import Channel
from services.runtime import Runtime, build_runtime
from tests.conftest import free_port


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "var", database_url=database_url)


@pytest.fixture
def state(settings: Settings) -> Iterator[Runtime]:
    state = build_runtime(settings, create=True)
    yield state
    state.close()


@pytest.fixture
def app(state: Runtime) -> FastAPI:
    return create_app(state=state)


@pytest.fixture
def make_key(state: Runtime) -> Callable[[Role], str]:
    def make(role: Role, name: str = "test") -> str:
        with state.sessions() as session, session.begin():
            _row, token = create_key(session, name=f"{name}-{role.value}", role=role)
        return token

    return make


@pytest.fixture
def admin_key(state: Runtime) -> str:
    return (state.settings.data_dir / "admin.key").read_text().strip()


@pytest.fixture
def client(app: FastAPI, admin_key: str) -> Iterator[TestClient]:
    with TestClient(app, headers={"Authorization": f"Bearer {admin_key}"}) as c:
        yield c


@pytest.fixture
def anon_client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture
def live_url(app: FastAPI) -> Iterator[str]:
    """The app served by uvicorn in a thread on 127.0.0.1 (a real socket)."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def mg_study(state: Runtime, mg_study_files: list[Path]) -> str:
    uids = {_ingest(state, p) for p in mg_study_files}
    (uid,) = uids
    return uid


def _ingest(state: Runtime, path: Path) -> str:
    staged = state.store.new_staging_path()
    shutil.copyfile(path, staged)
    return state.ingestor.ingest_file(staged, channel=Channel.STOW).study_uid
