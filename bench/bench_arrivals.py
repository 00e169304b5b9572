"""Study arrival: housekeeping's cost against the size of the index, and the ingest observer's
cost with and without an auto-classify policy, one run.

    .venv/bin/python bench/bench_arrivals.py [--passes 200] [--instances 100] [--repeats 5]

(a) housekeeping pass: one ``ArrivalTracker.housekeeping()`` (stale jobs sent again, unsettled
    studies looked at) with 10 and with 10,000 settled studies in the index, on SQLite and on the
    local PostgreSQL (a fresh database each, ANALYZEd after the rows are added, as autovacuum
    would). Median of --passes passes after 5 warm-up ones. Target: 10,000 within 1.2x of 10.
(b) C-STORE ingest per instance: `crgate scp` (the ingest path with the arrival observer; a
    broker is configured, so housekeeping runs in the workers' beat, not in the SCP) takes
    --instances small phantom mammograms (256x320, 4 views a study) over one dcmtk storescu
    association; wall time / instances. With the default policy only (no auto-classify) and with
    an MG auto-classify policy (quiet period 7 days: no job is made during the run), alternating,
    on SQLite and PostgreSQL; median of --repeats after one warm-up. Target: within 5 %.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench_ingest import (
    crgate_process,
    free_port,
    make_study,
    storescu_push,
    uid_variant,
    wait_echo,
)
from sqlalchemy import create_engine, insert, text
from sqlalchemy.orm import Session, sessionmaker

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BACKENDS = ("sqlite", "postgresql")
SIZES = (10, 10_000)
SMALL = (256, 320)
WEEK = 7 * 86400


@contextlib.contextmanager
def database(backend: str, work: Path) -> Iterator[str]:
    """A fresh, empty database URL of ``backend``; a PostgreSQL one is dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{work / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        return
    name = f"crgate_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def set_mg_policy(sessions: sessionmaker[Session], *, auto: bool) -> None:
    from services.core.policies import PolicyKey, set_policy

    changes: Any = {"cr": 20, "auto_classify": auto, "expected_instances": None}
    changes["quiet_seconds"] = WEEK
    with sessions.begin() as session:
        set_policy(session, PolicyKey.of("MG"), changes, actor="bench")


# -- (a) housekeeping -----------------------------------------------------------------------------


def add_settled(sessions: sessionmaker[Session], count: int) -> None:
    from services.core.db.tables import StudyArrival

    now = datetime.now(UTC)
    rows = [
        {
            "study_uid": f"1.2.826.0.1.3680043.10.1.{i}",
            "instance_count": 4,
            "classified_count": 0,
            "last_arrival": now,
            "settled_at": now,
        }
        for i in range(count)
    ]
    with sessions.begin() as session:
        session.execute(insert(StudyArrival), rows)
        session.execute(text("ANALYZE study_arrivals"))


def tracker_on(url: str, data_dir: Path, settled: int) -> Any:
    """A tracker on a fresh index at ``url`` holding ``settled`` settled studies and an MG
    auto-classify policy (so the pass has work it could do); its queue drops what it is sent."""
    from services.core.arrivals import ArrivalTracker
    from services.core.config import Settings
    from services.runtime import build_job_context

    class Drop:
        def enqueue(self, payload: Any) -> None:
            pass

    ctx = build_job_context(Settings(data_dir=data_dir, database_url=url), create=True)
    set_mg_policy(ctx.sessions, auto=True)
    add_settled(ctx.sessions, settled)
    return ArrivalTracker(ctx, Drop())


def bench_housekeeping(backend: str, work: Path, passes: int) -> dict[int, float]:
    """Median seconds of one pass with each of SIZES settled studies (one index each, passes
    alternating between them, after 5 warm-up passes)."""
    times: dict[int, list[float]] = {size: [] for size in SIZES}
    with contextlib.ExitStack() as stack:
        trackers = {
            size: tracker_on(
                stack.enter_context(database(backend, work)), work / f"hk-{backend}-{size}", size
            )
            for size in SIZES
        }
        for n in range(passes + 5):
            for size in SIZES[n % 2 :] + SIZES[: n % 2]:
                start = time.perf_counter()
                trackers[size].housekeeping()
                if n >= 5:
                    times[size].append(time.perf_counter() - start)
        for tracker in trackers.values():
            tracker.ctx.sessions.kw["bind"].dispose()
    return {size: statistics.median(t) for size, t in times.items()}


# -- (b) C-STORE ingest ---------------------------------------------------------------------------


def bench_ingest(
    backend: str, work: Path, sets: list[list[Path]], repeats: int
) -> dict[bool, float]:
    """Median seconds per instance with (True) and without (False) an auto-classify policy."""
    from services.core.db.engine import make_engine, session_factory

    times: dict[bool, list[float]] = {False: [], True: []}
    per_push = len(sets) // (2 * (repeats + 1))
    with database(backend, work) as url:
        data_dir = work / f"scp-{backend}"
        port = free_port()
        settings = {
            "CRGATE_DATABASE_URL": url,
            "CRGATE_BROKER_URL": "redis://127.0.0.1:6379/15",  # nothing is sent to it
        }
        with crgate_process("scp", data_dir, settings, dicom_port=port) as proc:
            wait_echo(port, proc, "crgate scp")
            engine = make_engine(url)
            sessions = session_factory(engine)
            for run in range(repeats + 1):  # run 0 warms up
                for turn, auto in enumerate((run % 2 == 0, run % 2 == 1)):
                    set_mg_policy(sessions, auto=auto)
                    start = (2 * run + turn) * per_push
                    files = [f for s in sets[start : start + per_push] for f in s]
                    seconds = storescu_push(port, [files])
                    if run:
                        times[auto].append(seconds / len(files))
                    for path in (data_dir / "instances").rglob("*.dcm"):
                        path.unlink()
                print(f"  {backend}: run {run}/{repeats} done", file=sys.stderr)
            engine.dispose()
    return {auto: statistics.median(v) for auto, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=200)
    parser.add_argument("--instances", type=int, default=100, help="per push (4 per study)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-housekeeping", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true")
    args = parser.parse_args()
    studies = max(1, args.instances // 4)

    with tempfile.TemporaryDirectory(prefix="bench-arrivals-") as tmp:
        work = Path(tmp)
        housekeeping = {}
        if not args.skip_housekeeping:
            for backend in BACKENDS:
                print(f"housekeeping on {backend} ...", file=sys.stderr)
                housekeeping[backend] = bench_housekeeping(backend, work, args.passes)
        ingest = {}
        if not args.skip_ingest:
            print("generating small phantom mammograms ...", file=sys.stderr)
            files = make_study(work / "study", SMALL)
            count = studies * 2 * (args.repeats + 1)
            sets = [uid_variant(files, k, work / f"set{k}") for k in range(1, count + 1)]
            os.sync()
            for backend in BACKENDS:
                ingest[backend] = bench_ingest(backend, work, sets, args.repeats)

    print(f"\nStudy arrival ({platform.node()}, {os.cpu_count()} CPUs)\n")
    if housekeeping:
        print(f"(a) housekeeping pass, median of {args.passes} (ms)")
        print(f"{'backend':<12} {'10 settled':>12} {'10,000 settled':>16} {'ratio':>8}")
        for backend, t in housekeeping.items():
            few, many = t[SIZES[0]], t[SIZES[1]]
            print(f"{backend:<12} {few * 1e3:12.2f} {many * 1e3:16.2f} {many / few:7.2f}x")
        print("target: 10,000 settled within 1.2x of 10\n")
    if not ingest:
        return
    total = studies * 4
    print(f"(b) C-STORE ingest per instance, {total} instances of {SMALL[0]}x{SMALL[1]} over one")
    print(f"association, median of {args.repeats} (ms)")
    print(f"{'backend':<12} {'no auto policy':>16} {'auto policy':>14} {'ratio':>8}")
    for backend, t in ingest.items():
        ratio = t[True] / t[False]
        print(f"{backend:<12} {t[False] * 1e3:16.2f} {t[True] * 1e3:14.2f} {ratio:7.3f}x")
    print("target: auto policy within 5 % of no auto policy")


if __name__ == "__main__":
    main()
