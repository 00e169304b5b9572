"""Process pools whose workers end with the process that made them.

A killed parent (SIGKILL, OOM killer) takes no pool worker with it: a worker waits on its task
queue forever (its siblings hold the queue's write end open), and a ``forkserver`` worker's
parent is the fork server, which stays up as long as a worker holds its "alive" pipe. So every
worker of :func:`process_pool` starts with :func:`_start_worker`:

- on Linux, PR_SET_PDEATHSIG: the kernel sends the worker SIGKILL when its parent ends (the
  owner itself under ``fork``, the fork server under ``forkserver``); it fires when the thread
  that started the worker ends, so a pool must not outlive that thread (a ``with`` block);
- everywhere, a daemon thread that ends the worker within :data:`WATCH_INTERVAL_S` once the
  owner is gone: no longer in /proc, a zombie, or its pid taken by a newer process (without
  /proc: ``kill(pid, 0)``). The fork server and Python's resource tracker then see their pipes
  close and end too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

WATCH_INTERVAL_S = 0.25
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ORPHAN_EXIT_CODE = 70  # what a worker exits with once its owner is gone


def process_pool(
    workers: int,
    initializer: Callable[..., object],
    initargs: tuple[Any, ...] = (),
    mp_context: BaseContext | None = None,
) -> ProcessPoolExecutor:
    """A ProcessPoolExecutor of ``workers`` processes, each set up by ``initializer(*initargs)``,
    that end when this process does (see the module docstring)."""
    owner = os.getpid()
    return ProcessPoolExecutor(
        workers,
        mp_context=mp_context,
        initializer=_start_worker,
        initargs=(owner, _start_time(owner), initializer, initargs),
    )


def _start_worker(
    owner: int,
    started: str | None,
    initializer: Callable[..., object],
    initargs: tuple[Any, ...],
) -> None:
    """In the worker: die with the parent and with the owner, then the pool's own set-up."""
    if sys.platform == "linux":
        _die_with_parent()
    if not _alive(owner, started):  # the owner died before the worker could watch it
        os._exit(ORPHAN_EXIT_CODE)
    threading.Thread(
        target=_watch, args=(owner, started), name="crgate-owner-watch", daemon=True
    ).start()
    initializer(*initargs)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl here: the watch thread still covers it
        pass


def _watch(owner: int, started: str | None) -> None:
    while _alive(owner, started):
        time.sleep(WATCH_INTERVAL_S)
    os._exit(ORPHAN_EXIT_CODE)


def _alive(pid: int, started: str | None) -> bool:
    """Whether process ``pid``, started at ``started`` (see :func:`_start_time`), still runs."""
    if started is not None:
        return _start_time(pid) == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks after boot, field 22 of /proc/PID/stat), which
    tells it from a later process given the same pid; None when it is gone or a zombie, or
    where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
    if len(fields) < 20 or fields[0] in ("Z", "X", "x"):
        return None
    return fields[19]
