"""Pool workers end with the process that made them (services/lab/pools.py), under both start
methods the lab uses: ``fork`` (training's compression) and ``forkserver`` (the CR study)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.processes import in_own_session, kill_and_collect_survivors, session_processes

OWNER = textwrap.dedent(
    """
    import multiprocessing, os, sys, time

    from services.lab.pools import process_pool


    def pid_after(seconds: float) -> int:
        time.sleep(seconds)
        return os.getpid()


    if __name__ == "__main__":
        pool = process_pool(2, int, (), multiprocessing.get_context(sys.argv[1]))
        workers = set(pool.map(pid_after, [0.3] * 4))
        for _ in range(2):
            pool.submit(time.sleep, 120)
        print(*sorted(workers), flush=True)
        time.sleep(120)
    """
)


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_workers_end_when_their_owner_is_killed(method: str, tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    with in_own_session(
        [sys.executable, str(script), method],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    ) as owner:
        assert owner.stdout is not None
        workers = {int(pid) for pid in owner.stdout.readline().split()}
        assert len(workers) == 2, "the pool did not start two workers"
        assert workers <= set(session_processes(owner.pid))
        assert kill_and_collect_survivors(owner) == {}
        owner.stdout.close()
