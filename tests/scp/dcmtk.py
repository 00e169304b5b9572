"""dcmtk's echoscu and storescu as real peers (subprocesses). A missing tool fails the test."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.dicomtools import require


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
