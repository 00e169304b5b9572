"""Which processes a command left behind: everything in its session (:func:`in_own_session`
starts it in one; the session id is then its pid), read from /proc."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of the live processes of session ``sid`` (zombies left out: they
    run nothing and hold nothing but their exit status)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
        if fields[0] not in ("Z", "X", "x") and int(fields[3]) == sid:  # field 6: session
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def wait_until_gone(sid: int, seconds: float) -> dict[int, str]:
    """The processes of session ``sid`` still alive after ``seconds`` (empty once all ended)."""
    deadline = time.monotonic() + seconds
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def require_proc() -> None:
    if not Path("/proc/self/stat").is_file():
        pytest.skip("needs /proc (Linux)")


def kill_session(sid: int) -> None:
    """SIGKILL whatever is left of session ``sid``."""
    for pid in session_processes(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def in_own_session(command: list[str], **popen: Any) -> Iterator[subprocess.Popen[Any]]:
    """``command`` started in a session of its own; whatever is left of it is killed at the end,
    however the test ends."""
    require_proc()
    proc = subprocess.Popen(command, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        kill_session(proc.pid)


def kill_and_collect_survivors(proc: subprocess.Popen[Any], seconds: float = 5) -> dict[int, str]:
    """SIGKILL ``proc`` (the head of its session) and return what of the session is still
    alive ``seconds`` later."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return wait_until_gone(proc.pid, seconds)
