"""Kill -9 chaos: a PACS keeps pushing while the server is killed with SIGKILL and restarted.

    PYTHONPATH=. .venv/bin/python bench/bench_chaos.py [--server serve|scp] [--database-url URL]
        [--instances 300] [--kill-every 1.5] [--seed 1]

A sender thread stores distinct 128x128 CT instances by C-STORE (pynetdicom, one association
per instance, as many PACS do) and records which ones the server acknowledged (status 0x0000).
A killer sends SIGKILL to the whole server (its process group) at random moments (uniform in
0.5x to 1.5x ``--kill-every`` seconds after it answered again) and restarts it on the same data
directory and database; sends during the outage fail and are not retried (nothing is
acknowledged, so nothing is owed). At the end the server is started once more and every
acknowledged instance is looked up in the index and read from the store: present with
identical pixels, lost (no row or no file) or corrupt (the file does not parse or its pixels
differ). Loopback only; the server is `crgate serve` (SQLite by default) or `crgate scp`
(give a PostgreSQL URL). Prints one Markdown row for RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE
from sqlalchemy import select

from services.core.db.engine import make_engine, session_factory
from services.core.db.tables import Instance
from services.core.dicom.uids import new_uid
from tests.conftest import free_port

CLI = [sys.executable, "-c", "from services.cli import app; app()"]
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def instance(number: int, study: str, series: str) -> tuple[Dataset, str]:
    """A distinct CT instance and the sha256 of its pixel bytes."""
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = pydicom.dcmread(path)
    rng = np.random.default_rng(number)
    pixels = ds.pixel_array.astype(np.int16) + rng.integers(0, 64, ds.pixel_array.shape).astype(
        np.int16
    )
    ds.PixelData = pixels.tobytes()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = number
    return ds, hashlib.sha256(ds.PixelData).hexdigest()


class Server:
    """``crgate serve`` or ``crgate scp`` on one data directory, killed and started again."""

    def __init__(self, kind: str, data_dir: Path, database_url: str, log: Path) -> None:
        self.kind, self.data_dir, self.database_url, self.log = kind, data_dir, database_url, log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRGATE_")}
        env["CRGATE_DATABASE_URL"] = self.database_url
        command = [*CLI, self.kind]
        command += ["--data-dir", str(self.data_dir)]
        if self.kind == "serve":
            command += ["--http-port", str(free_port()), "--dicom-port", str(self.port)]
        else:
            command += ["--dicom-port", str(self.port)]
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                command, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while not self.echo():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text()[-3000:])
            time.sleep(0.1)

    def echo(self) -> bool:
        ae = AE(ae_title="CHAOS")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", self.port, ae_title="CRGATE")
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return bool(status) and status.Status == 0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def send(port: int, ds: Dataset) -> int | None:
    ae = AE(ae_title="CHAOS")
    ae.add_requested_context(CT_IMAGE, EXPLICIT_LE)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="CRGATE")
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds)
        code = int(status.Status) if status else None
    except Exception:  # the server died mid-association
        code = None
    finally:
        if assoc.is_established:
            assoc.release()
    return code


def verify(database_url: str, data_dir: Path, acknowledged: dict[str, str]) -> dict[str, int]:
    engine = make_engine(database_url)
    counts = {"identical": 0, "lost": 0, "corrupt": 0}
    try:
        with session_factory(engine)() as session:
            rows = {
                r.sop_instance_uid: r.path
                for r in session.scalars(select(Instance).where(Instance.channel != "worker"))
            }
    finally:
        engine.dispose()
    for uid, digest in acknowledged.items():
        path = rows.get(uid)
        full = data_dir.resolve() / path if path is not None else None
        if full is None or not full.is_file():
            counts["lost"] += 1
            continue
        try:
            same = hashlib.sha256(pydicom.dcmread(full).PixelData).hexdigest() == digest
        except Exception:  # a file that does not parse is corrupt
            same = False
        counts["identical" if same else "corrupt"] += 1
    counts["rows"] = len(rows)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", choices=("serve", "scp"), default="serve")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--kill-every", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    chance = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "var"
        url = args.database_url or f"sqlite:///{data_dir / 'index.db'}"
        subprocess.run(
            [*CLI, "migrate", "--data-dir", str(data_dir)],
            env={**os.environ, "CRGATE_DATABASE_URL": url},
            check=True,
            capture_output=True,
        )
        server = Server(args.server, data_dir, url, Path(tmp) / "server.log")
        server.start()
        study, series = new_uid(), new_uid()
        acknowledged: dict[str, str] = {}
        refused = 0
        done = threading.Event()
        lock = threading.Lock()

        def sender() -> None:
            nonlocal refused
            for number in range(1, args.instances + 1):
                ds, digest = instance(number, study, series)
                code = send(server.port, ds)
                with lock:
                    if code == 0:
                        acknowledged[str(ds.SOPInstanceUID)] = digest
                    else:
                        refused += 1
            done.set()

        thread = threading.Thread(target=sender)
        started = time.monotonic()
        thread.start()
        kills = 0
        try:
            while not done.wait(args.kill_every * chance.uniform(0.5, 1.5)):
                server.kill()
                kills += 1
                server.start()
            thread.join()
            server.stop()
            server.start()  # the recovery a restart does (staged files dropped, ...)
            server.stop()
        finally:
            server.kill()
        seconds = time.monotonic() - started
        counts = verify(url, data_dir, acknowledged)
    backend = "PostgreSQL" if url.startswith("postgresql") else "SQLite"
    print(
        f"| {args.server} + {backend} | {args.instances} | {kills} | {len(acknowledged)} | "
        f"{refused} | {counts['identical']} | {counts['lost']} | {counts['corrupt']} | "
        f"{seconds:.0f} s |"
    )


if __name__ == "__main__":
    main()
