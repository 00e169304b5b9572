"""A STOW-RS body that stalls is refused after CRGATE_HTTP_BODY_TIMEOUT with 408 and its staged
files are removed (issue 16: 40 slow 1 GiB declarations held 40 staged files for 75 s)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from services.core.config import Settings
from services.runtime import Runtime
from tests.api.test_stow import BOUNDARY, SQLITE_ONLY, STOW_TYPE, assert_nothing_left


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "var", database_url=database_url, http_body_timeout=1)


@SQLITE_ONLY
def test_a_stalled_body_is_408_and_leaves_nothing(
    live_url: str, admin_key: str, state: Runtime, tiny_study_files: list[Path]
) -> None:
    address = urlsplit(live_url)
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {admin_key}\r\n"
        f"Content-Type: {STOW_TYPE}\r\nContent-Length: {1024**3}\r\n\r\n"
    ).encode()
    first = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    with socket.create_connection((address.hostname, address.port), timeout=15) as sock:
        sock.sendall(head + first + tiny_study_files[0].read_bytes()[:4096])
        started = time.monotonic()
        answer = sock.recv(4096)
        waited = time.monotonic() - started
        while not answer.endswith(b"}") and (more := sock.recv(4096)):
            answer += more  # the problem body
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"CRGATE_HTTP_BODY_TIMEOUT" in answer
    assert waited < 10
    assert_nothing_left(state)
