"""A transfer that never completes (A-ABORT, or the sender killed) leaves nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from services.core.storage import InstanceStore
from services.lab.phantom import PhantomConfig, generate_study
from services.scp.server import ScpServer
from tests.scp.conftest import store_files, stored_rows
from tests.scp.dcmtk import output, stored_ok, storescu

pytestmark = pytest.mark.tools

SENDER = Path(__file__).with_name("partial_sender.py")


@pytest.fixture(scope="module")
def medium_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 640 KB phantom mammogram (40 P-DATA fragments of 16 KB)."""
    study = generate_study(1, seed=3, config=PhantomConfig(width=512, height=640))
    path = tmp_path_factory.mktemp("medium") / "one.dcm"
    next(iter(study.datasets.values())).save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def sender(scp: ScpServer, medium_file: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, str(SENDER), str(scp.port), str(medium_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    assert proc.stdout is not None
    proc.stdout.close()
    assert proc.stdin is not None
    proc.stdin.close()


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def half_received(sender: subprocess.Popen[str], store: InstanceStore) -> Path:
    """Wait until the sender stopped half-way; the partial data set is in incoming/."""
    assert sender.stdout is not None
    line = sender.stdout.readline().strip()
    if line != "partial":
        sender.kill()
        pytest.fail(f"the partial sender failed: {line}\n{sender.stdout.read()}")
    wait_for(lambda: len(store_files(store, "incoming")) == 1, "the partial file in incoming/")
    (partial,) = store_files(store, "incoming")
    assert partial.name.startswith("stage-")
    return partial


@pytest.mark.parametrize("how", ["a-abort", "sigkill"])
def test_unfinished_transfer_leaves_no_file(
    how: str,
    scp: ScpServer,
    sender: subprocess.Popen[str],
    store: InstanceStore,
    sessions: sessionmaker[Session],
    medium_file: Path,
) -> None:
    partial = half_received(sender, store)
    assert 0 < partial.stat().st_size < medium_file.stat().st_size
    if how == "a-abort":
        assert sender.stdin is not None
        sender.stdin.write("abort\n")
        sender.stdin.flush()
    else:
        sender.send_signal(signal.SIGKILL)

    wait_for(lambda: not partial.exists(), "the partial file to be removed")
    assert store_files(store, "incoming") == []
    assert store_files(store, "instances") == []
    assert stored_rows(sessions) == []

    proc = storescu(scp.port, [medium_file])  # the SCP still serves
    assert stored_ok(proc, 1), output(proc)
    assert len(store_files(store, "instances")) == 1
    assert store_files(store, "incoming") == []
