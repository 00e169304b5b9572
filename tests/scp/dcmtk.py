"""dcmtk's echoscu, storescu and storescp as real peers (subprocesses). A missing tool fails
the test."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.conftest import free_port
from tests.dicomtools import require


@contextlib.contextmanager
def storescp(*options: str, aet: str = "PACS", into: Path | None = None) -> Iterator[int]:
    """A dcmtk storescp as a PACS on a free port (its default syntaxes are uncompressed only;
    ``+xa`` accepts JPEG 2000 too), writing what it receives into ``into`` when given; stopped
    at the end. Yields its port."""
    exe = require("storescp", "dcmtk")
    port = free_port()
    where = ["-od", str(into)] if into is not None else []
    proc = subprocess.Popen(
        [exe, *options, "-aet", aet, *where, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        assert proc.poll() is None, "storescp did not start"
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def echoscu(
    port: int, *, aet: str = "ECHOSCU", aec: str = "CRGATE"
) -> subprocess.CompletedProcess[str]:
    exe = require("echoscu", "dcmtk")
    return subprocess.run(
        [exe, "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def storescu(
    port: int,
    files: Sequence[Path],
    *options: str,
    aet: str = "STORESCU",
    aec: str = "CRGATE",
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """One association sending ``files``; ``-d`` output so responses (Error Comment) show."""
    exe = require("storescu", "dcmtk")
    return subprocess.run(
        [exe, "-d", *options, "-aet", aet, "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def stored_ok(proc: subprocess.CompletedProcess[str], count: int) -> bool:
    """storescu exited 0 and reported ``count`` successful store responses."""
    return proc.returncode == 0 and successes(proc) == count


def successes(proc: subprocess.CompletedProcess[str]) -> int:
    """How many C-STORE responses with status Success storescu -d printed."""
    return len(re.findall(r"DIMSE Status\s+: 0x0000: Success", output(proc)))


def findscu(
    port: int,
    *keys: str,
    options: Sequence[str] = ("-S",),
    out: Path | None = None,
    aet: str = "FINDSCU",
    aec: str = "CRGATE",
) -> subprocess.CompletedProcess[str]:
    """One C-FIND with ``keys`` (``Keyword=value``, or ``Keyword`` for a return key); with
    ``out``, each response identifier is written there (rsp0001.dcm, ...)."""
    exe = require("findscu", "dcmtk")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    extract = ["-X", "-od", str(out)] if out is not None else []
    args = [arg for key in keys for arg in ("-k", key)]
    return subprocess.run(
        [exe, "-d", *options, *extract, "-aet", aet, "-aec", aec, *args, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def getscu(
    port: int,
    out: Path,
    *keys: str,
    options: Sequence[str] = ("-S",),
    aet: str = "GETSCU",
    aec: str = "CRGATE",
) -> subprocess.CompletedProcess[str]:
    """One C-GET with ``keys``; the instances received are written into ``out``."""
    exe = require("getscu", "dcmtk")
    out.mkdir(parents=True, exist_ok=True)
    args = [arg for key in keys for arg in ("-k", key)]
    peer = ["-aet", aet, "-aec", aec, "127.0.0.1", str(port)]
    return subprocess.run(
        [exe, "-d", *options, "-od", str(out), *args, *peer],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def suboperations(proc: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """getscu's final report: Remaining, Completed, Failed, Warning sub-operation counts."""
    found = re.findall(r"Number of (\w+) Suboperations\s*: (\d+)", output(proc))
    return {name: int(count) for name, count in found}
