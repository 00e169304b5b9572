"""Study latency, throughput and worker memory of the classification service, one run.

    .venv/bin/python bench/bench_study.py [--cr 20] [--studies 3] [--size 3328x4096]
        [--syntax htj2k]

Starts what docker-compose starts (`crgate migrate`, `api`, `scp`, `worker`) as local processes
on the local PostgreSQL and Redis, sets an MG policy (auto-classify, 4 views), and pushes
4-view phantom studies with dcmtk `storescu`.

Rows:
  bare reference      sum over the study's 4 images of one OpenJPEG encode at the CR (crgate's
                      low-level call, no rate correction) + one ONNX inference per breast
                      (preprocessing included): the least any implementation must do
  study latency       storescu start -> result visible at GET /studies/{uid}/results
                      (1 worker process); target <= 1.3x the bare reference
  throughput          studies/hour with 1 and with 2 worker processes (all studies pushed at
                      once, until the last result)
  worker peak RSS     VmHWM of the worker's pool processes (target < 2 GB)
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pydicom
import redis
from sqlalchemy import create_engine, text

from services.core.codecs.openjpeg import EncodeParams, encode_frame
from services.core.config import Settings
from services.core.inference.breasts import classify_breasts, group_breasts
from services.core.inference.runtime import get_classifier
from services.lab.phantom import PhantomConfig, parse_size, write_studies

CRGATE = Path(sys.executable).with_name("crgate")
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BROKER = "redis://127.0.0.1:6379/13"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bare_reference(files: list[Path], cr: float, threads: int) -> float:
    """Seconds for the bare encodes of a study's images plus inference of its breasts."""
    datasets = [(str(f), pydicom.dcmread(f)) for f in files]
    frames = [(ds.pixel_array, int(ds.BitsStored)) for _, ds in datasets]
    classifier = get_classifier(Settings().models_dir / f"{Settings().default_model}.json")
    breasts = group_breasts(datasets)
    classify_breasts(classifier, breasts)  # warm-up
    start = time.perf_counter()
    for frame, bits in frames:
        params = EncodeParams(bits, False, reversible=False, rate=cr * bits / 16, threads=threads)
        encode_frame(frame, params)
    classify_breasts(classifier, breasts)
    return time.perf_counter() - start


class Stack:
    def __init__(self, workdir: Path, workers: int) -> None:
        self.db = f"crgate_bench_{uuid.uuid4().hex[:8]}"
        self.admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db}"'))
        redis.Redis.from_url(BROKER).flushdb()
        self.http_port, self.dicom_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRGATE_")}
        env.update(
            CRGATE_DATA_DIR=str(workdir / "data"),
            CRGATE_DATABASE_URL=PG_ADMIN.rsplit("/", 1)[0] + f"/{self.db}",
            CRGATE_BROKER_URL=BROKER,
            CRGATE_HTTP_PORT=str(self.http_port),
            CRGATE_DICOM_PORT=str(self.dicom_port),
            CRGATE_LOG_LEVEL="WARNING",
        )
        subprocess.run([str(CRGATE), "migrate"], env=env, check=True, capture_output=True)
        self.procs = [
            subprocess.Popen(
                [str(CRGATE), *cmd],
                env=env,
                stdout=(workdir / f"{cmd[0]}.log").open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            for cmd in (["api"], ["scp"], ["worker", "--concurrency", str(workers)])
        ]
        self.url = f"http://127.0.0.1:{self.http_port}"
        key = (workdir / "data" / "admin.key").read_text().strip()
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        deadline = time.monotonic() + 90
        while True:
            try:
                if self.http.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("crgate did not become ready")
            time.sleep(0.2)
        time.sleep(3)  # the worker's pool processes load the model at start

    def set_policy(self, cr: float, syntax: str | None = None) -> None:
        body = {"modality": "MG", "cr": cr, "auto_classify": True, "expected_instances": 4}
        if syntax is not None:
            body["syntax"] = syntax
        self.http.post("/policies", json=body).raise_for_status()

    def push(self, files: list[Path]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["storescu", "-aec", "CRGATE", "127.0.0.1", str(self.dicom_port), *map(str, files)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_results(self, study_uids: list[str], timeout: float = 1800) -> float:
        start = time.perf_counter()
        pending = set(study_uids)
        while pending:
            for uid in list(pending):
                if self.http.get(f"/studies/{uid}/results").json():
                    pending.discard(uid)
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"no result for {pending}")
            time.sleep(0.05)
        return time.perf_counter()

    def worker_peak_rss_mb(self) -> float:
        worker = self.procs[2]
        children = subprocess.run(
            ["pgrep", "-g", str(worker.pid)], capture_output=True, text=True
        ).stdout.split()
        peaks = []
        for pid in children:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
        return max(peaks, default=float("nan"))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)'))


def study_files(root: Path) -> dict[str, list[Path]]:
    studies: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.dcm")):
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        studies.setdefault(uid, []).append(path)
    return studies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cr", type=float, default=20.0)
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--size", default="3328x4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--syntax", default=None, help="the MG policy's syntax (default: j2k)")
    args = parser.parse_args()
    width, height = parse_size(args.size)
    threads = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="crgate-bench-") as tmp:
        root = Path(tmp)
        n_total = args.repeats + 2 * args.studies
        write_studies(
            root / "phantoms", n_total, seed=11, config=PhantomConfig(width=width, height=height)
        )
        studies = list(study_files(root / "phantoms").values())
        latency_sets = studies[: args.repeats]
        bare = statistics.median(bare_reference(f, args.cr, threads) for f in latency_sets)

        stack = Stack(root / "one", workers=1)
        try:
            stack.set_policy(args.cr, args.syntax)
            latencies, pushes, parts = [], [], []
            for files in latency_sets:
                uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                start = time.perf_counter()
                stack.push(files).wait()
                pushes.append(time.perf_counter() - start)
                latencies.append(stack.wait_results([uid]) - start)
                parts.append(job_breakdown(stack.http.get(f"/studies/{uid}/results").json()[0]))
            latency = statistics.median(latencies)
            batch = studies[args.repeats : args.repeats + args.studies]
            start = time.perf_counter()
            for files in batch:
                stack.push(files).wait()
            uids = [
                str(pydicom.dcmread(f[0], stop_before_pixels=True).StudyInstanceUID) for f in batch
            ]
            per_hour_1 = len(batch) * 3600 / (stack.wait_results(uids) - start)
            rss = stack.worker_peak_rss_mb()
        finally:
            stack.close()

        stack = Stack(root / "two", workers=2)
        try:
            stack.set_policy(args.cr, args.syntax)
            batch = studies[args.repeats + args.studies :]
            start = time.perf_counter()
            for files in batch:
                stack.push(files).wait()
            uids = [
                str(pydicom.dcmread(f[0], stop_before_pixels=True).StudyInstanceUID) for f in batch
            ]
            per_hour_2 = len(batch) * 3600 / (stack.wait_results(uids) - start)
        finally:
            stack.close()

    print(
        f"4-view study {width}x{height}, CR {args.cr:g} ({args.syntax or 'j2k'}), {threads} "
        f"cores, median of {args.repeats}"
    )
    print(f"{'row':<34}{'value':>12}{'ratio':>9}")
    print(f"{'bare encodes + inference (s)':<34}{bare:>12.2f}{1.0:>9.2f}")
    print(f"{'study latency, storescu->result (s)':<34}{latency:>12.2f}{latency / bare:>9.2f}")
    print(f"{'throughput, 1 worker (studies/h)':<34}{per_hour_1:>12.0f}")
    print(f"{'throughput, 2 workers (studies/h)':<34}{per_hour_2:>12.0f}")
    print(f"{'worker peak RSS (MB)':<34}{rss:>12.0f}")
    print("where the latency goes (median over the latency runs, seconds):")
    print(f"  {'storescu push (4 files, acknowledged)':<44}{statistics.median(pushes):>8.2f}")
    for name in parts[0]:
        print(f"  {name:<44}{statistics.median(p[name] for p in parts):>8.2f}")


def job_breakdown(result: dict[str, Any]) -> dict[str, float]:
    """The job's own timings from its result JSON: per-image stages summed over the study."""
    images = result["images"]
    timings = result["timings_ms"]
    encode = sum(i["encode_ms"] for i in images) / 1000
    metrics = sum(i["metrics_ms"] for i in images) / 1000  # output decode + PSNR/SSIM
    classify = timings["classify"] / 1000
    return {
        "job: encodes at the CR": encode,
        "job: decode outputs + PSNR/SSIM/max error": metrics,
        "job: read, decode inputs, classify x2": classify - encode - metrics,
        "job: overlays + 9 DICOM outputs (ingest)": timings["outputs"] / 1000,
        "job: total": timings["total"] / 1000,
    }


if __name__ == "__main__":
    main()
