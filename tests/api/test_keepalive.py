"""An unexpected error is a 500 problem and the connection stays open for the next request
(issue 16: Starlette re-raised it to uvicorn, which closed the keep-alive connection)."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import pytest

from services.api.routes import classify as classify_routes
from tests.api.test_stow import SQLITE_ONLY


def _exchange(sock: socket.socket, path: str, key: str) -> bytes:
    """One HTTP/1.1 request on ``sock`` and its whole response (Content-Length framed)."""
    request = f"GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n\r\n"
    sock.sendall(request.encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {path}: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed inside the body of {path}"
        body += chunk
    return head + b"\r\n\r\n" + body


@SQLITE_ONLY
def test_a_500_keeps_the_connection_open(
    live_url: str, admin_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object) -> object:
        raise RuntimeError("a bug")

    monkeypatch.setattr(classify_routes, "job_view", broken)
    address = urlsplit(live_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        first = _exchange(sock, "/jobs/abc", admin_key)
        assert first.startswith(b"HTTP/1.1 500"), first[:200]
        assert b"application/problem+json" in first and b"RuntimeError" in first
        second = _exchange(sock, "/healthz", admin_key)
        assert second.startswith(b"HTTP/1.1 200"), second[:200]
