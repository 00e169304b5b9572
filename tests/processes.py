"""Which processes a command left behind: everything in its session (start it with
``start_new_session=True``; its session id is then its pid), read from /proc."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

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
