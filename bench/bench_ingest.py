"""Ingest throughput: crgate's SCP next to dcmtk's storescp and a bare pynetdicom SCP, one run.

    .venv/bin/python bench/bench_ingest.py [--repeats 5] [--skip-stow] [--skip-rss]

Four full-size phantom mammograms (3328x4096, 16 bits allocated, about 27 MB each) are pushed
with dcmtk ``storescu`` over one association (4 files) and over 4 parallel associations (1 file
each) to:
  crgate SCP        services.scp.server + the ingest path: streamed into incoming/, header check,
                    fsync, link into place, fsync dir, SQLite row committed, then success
  dcmtk storescp    ``storescp -od DIR PORT`` (one association at a time), and with ``--fork``
                    (a process per association) in the parallel case; neither fsyncs
  bare pynetdicom   chunked data set to disk, fsync, rename, success (about 20 lines)
Every measurement starts a fresh receiver with an empty directory (not timed); the time is the
wall time of the storescu process(es). Median of the repeats after one warm-up; MB = 10^6 bytes.
Targets: crgate >= 1.2x dcmtk's throughput and >= 0.85x the bare SCP's.

Then, unless skipped: STOW-RS with httpx against ``crgate api`` (the same 4 files, one request
and 4 parallel requests; "vs bare": its throughput / the bare pynetdicom SCP's measured above
in the same run, with as many associations), and the peak RSS (VmHWM) of ``crgate serve``
while 8 associations each push 4 such files (distinct UIDs) at once: target < 400 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CRGATE = Path(sys.executable).with_name("crgate")
MB = 1e6
BARE_SHAPE = {"1 request": "1 association", "4 requests": "4 associations"}  # STOW vs floor


# -- receivers run as child processes of this script (``--serve KIND DIR PORT``) ----------------


def serve_crgate(out: Path, port: int) -> None:
    import logging

    from services.core.config import Settings
    from services.runtime import build_runtime, start_scp

    logging.basicConfig(level=logging.WARNING)
    runtime = build_runtime(Settings(data_dir=out, dicom_port=port), create=True)
    server = start_scp(runtime)
    wait_for_sigterm()
    server.shutdown(drain_seconds=1)
    runtime.close()


def serve_bare(out: Path, port: int) -> None:
    from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
    from pynetdicom.events import Event
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    _config.STORE_RECV_CHUNKED_DATASET = True

    def on_store(event: Event) -> int:
        path = event.dataset_path
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        uid = event.request.AffectedSOPInstanceUID  # type: ignore[union-attr]
        path.replace(out / f"{uid}.dcm")
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 0
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    wait_for_sigterm()
    assert server is not None
    server.shutdown()


def wait_for_sigterm() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()


# -- helpers ------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        sys.exit(f"{name} not found: install the Debian package dcmtk")
    return path


def wait_echo(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            sys.exit(f"{what} exited before answering C-ECHO")
        done = subprocess.run(
            [tool("echoscu"), "127.0.0.1", str(port)], capture_output=True, check=False
        )
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            sys.exit(f"{what} did not answer C-ECHO on port {port}")
        time.sleep(0.1)


def wait_http(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            sys.exit(f"crgate exited before answering {url}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            sys.exit(f"no answer from {url}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def receiver(kind: str, out: Path) -> Iterator[int]:
    """A fresh receiver of ``kind`` writing under ``out``; yields its port."""
    port = free_port()
    if kind.startswith("dcmtk storescp"):
        fork = ["--fork"] if kind.endswith("--fork") else []
        command = [tool("storescp"), *fork, "-od", str(out), str(port)]
    else:
        mode = "crgate" if kind == "crgate SCP" else "bare"
        command = [sys.executable, __file__, "--serve", mode, str(out), str(port)]
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_echo(port, proc, kind)
        yield port
    finally:
        stop(proc)


def storescu_push(port: int, groups: list[list[Path]]) -> float:
    """Push each group over its own association, all at once; wall seconds."""
    exe = tool("storescu")
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [exe, "-aet", "BENCH", "-aec", "CRGATE", "127.0.0.1", str(port), *map(str, group)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for group in groups
    ]
    outputs = [p.communicate()[0] for p in procs]
    seconds = time.perf_counter() - start
    for proc, output in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            sys.exit(f"storescu failed: {output.decode(errors='replace')}")
    return seconds


def stored_files(out: Path) -> set[Path]:
    """DICOM files a receiver wrote (crgate: under instances/; the others: in ``out``)."""
    return {
        p
        for p in out.rglob("*")
        if p.is_file()
        and "incoming" not in p.parts
        and "locks" not in p.parts  # crgate's per-UID lock files
        and p.suffix not in (".db", ".key", ".db-wal", ".db-shm")
    }


# -- inputs ---------------------------------------------------------------------------------------


def make_study(directory: Path, size: tuple[int, int] | None = None) -> list[Path]:
    """One phantom study's 4 views, full size or ``size`` (width, height)."""
    from services.lab.phantom import PhantomConfig, generate_study

    directory.mkdir(parents=True, exist_ok=True)
    # the subtle preset: the generator's defaults when BENCHMARKS.md's figures were measured
    fixed = {"width": size[0], "height": size[1]} if size else {}
    config = PhantomConfig.from_overrides({}, preset="subtle", **fixed)
    study = generate_study(0, seed=7, config=config)
    paths = []
    for view, ds in study.datasets.items():
        path = directory / f"{view}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def uid_variant(paths: list[Path], k: int, directory: Path) -> list[Path]:
    """Copies of ``paths`` whose study, series and SOP Instance UIDs end in ``k`` (same length)."""
    import pydicom

    uids: set[str] = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    assert all(len(u.rsplit(".", 1)[1]) > 6 for u in uids)
    mapping = {u.encode(): f"{u[:-4]}{k:04d}".encode() for u in uids}
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        data = path.read_bytes()
        for old, new in mapping.items():
            data = data.replace(old, new)
        target = directory / path.name
        target.write_bytes(data)
        out.append(target)
    return out


# -- measurements ---------------------------------------------------------------------------------


def bench_scps(sets: list[list[Path]], work: Path, repeats: int) -> dict[tuple[str, str], float]:
    """Each receiver runs through all repeats of a shape; run k pushes UID set k to each."""
    times: dict[tuple[str, str], list[float]] = {}
    for index, shape in enumerate(("1 association", "4 associations")):
        parallel = index == 1
        kinds = ["crgate SCP", "dcmtk storescp", "bare pynetdicom"]
        if parallel:
            kinds.insert(2, "dcmtk storescp --fork")
        with contextlib.ExitStack() as stack:
            outs = {kind: work / f"out-{n}" for n, kind in enumerate(kinds)}
            ports = {kind: stack.enter_context(receiver(kind, outs[kind])) for kind in kinds}
            for run in range(repeats + 1):  # run 0 warms up caches and code paths
                files = sets[index * (repeats + 1) + run]
                groups = [[f] for f in files] if parallel else [files]
                turn = run % len(kinds)
                for kind in kinds[turn:] + kinds[:turn]:  # rotate the order
                    before = stored_files(outs[kind])
                    seconds = storescu_push(ports[kind], groups)
                    stored = stored_files(outs[kind]) - before
                    if len(stored) != len(files):
                        sys.exit(f"{kind} stored {len(stored)} of {len(files)} files")
                    for path in stored:  # keep the disk small; the index rows stay
                        path.unlink()
                    if run:
                        times.setdefault((kind, shape), []).append(seconds)
                print(f"  {shape}: run {run}/{repeats} done", file=sys.stderr)
    return {key: statistics.median(v) for key, v in times.items()}


def stow_push(url: str, key: str, groups: list[list[Path]]) -> float:
    boundary = "crgate-bench-boundary"

    def body(group: list[Path]) -> Iterator[bytes]:
        for path in group:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }

    def post(group: list[Path]) -> int:
        with httpx.Client(timeout=300) as client:
            answer = client.post(f"{url}/dicomweb/studies", content=body(group), headers=headers)
            return answer.status_code

    start = time.perf_counter()
    with ThreadPoolExecutor(len(groups)) as pool:
        codes = list(pool.map(post, groups))
    seconds = time.perf_counter() - start
    if any(c != 200 for c in codes):
        sys.exit(f"STOW-RS answered {codes}")
    return seconds


@contextlib.contextmanager
def crgate_process(
    command: str, data_dir: Path, settings: dict[str, str] | None = None, **ports: int
) -> Iterator[subprocess.Popen[bytes]]:
    """`crgate COMMAND` on ``data_dir``; ``settings``: CRGATE_* variables it gets (no others)."""
    args = [str(CRGATE), command, "--data-dir", str(data_dir)]
    for name, port in ports.items():
        args += [f"--{name.replace('_', '-')}", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRGATE_")}
    env["CRGATE_LOG_LEVEL"] = "WARNING"
    env.update(settings or {})
    if command != "serve":  # as compose does: the data directory first, then the service
        migrate = [str(CRGATE), "migrate", "--data-dir", str(data_dir)]
        subprocess.run(migrate, cwd=ROOT, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        stop(proc)


def bench_stow(files: list[Path], work: Path, repeats: int) -> dict[str, float]:
    """One `crgate api` per shape; run k posts UID set k (one request, or 4 in parallel)."""
    times: dict[str, list[float]] = {}
    for index, shape in enumerate(("1 request", "4 requests")):
        sets = [
            uid_variant(files, 50 + 10 * index + k, work / f"stow{k}") for k in range(repeats + 1)
        ]
        os.sync()
        data_dir = work / f"stow-{index}"
        port = free_port()
        with crgate_process("api", data_dir, http_port=port) as proc:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/healthz", proc)
            key = (data_dir / "admin.key").read_text().strip()
            for run, variant in enumerate(sets):
                groups = [[f] for f in variant] if index else [variant]
                seconds = stow_push(url, key, groups)
                if run:
                    times.setdefault(shape, []).append(seconds)
                for path in (data_dir / "instances").rglob("*.dcm"):
                    path.unlink()
        for variant in sets:
            shutil.rmtree(variant[0].parent)
        shutil.rmtree(data_dir)
    return {k: statistics.median(v) for k, v in times.items()}


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def bench_rss(files: list[Path], work: Path) -> tuple[float, float, float, int]:
    """(RSS before, peak RSS, seconds, bytes) of `crgate serve` taking 8 x 4 files at once."""
    groups = [uid_variant(files, k, work / f"rss{k}") for k in range(101, 109)]
    os.sync()
    data_dir = work / "serve"
    shutil.rmtree(data_dir, ignore_errors=True)
    http_port, dicom_port = free_port(), free_port()
    with crgate_process("serve", data_dir, http_port=http_port, dicom_port=dicom_port) as proc:
        wait_http(f"http://127.0.0.1:{http_port}/healthz", proc)
        before = vm_kib(proc.pid, "VmRSS") / 1024
        seconds = storescu_push(dicom_port, groups)
        peak = vm_kib(proc.pid, "VmHWM") / 1024
    stored = len(list((data_dir / "instances").rglob("*.dcm")))
    if stored != 32:
        sys.exit(f"crgate serve stored {stored} of 32 files")
    size = sum(p.stat().st_size for group in groups for p in group)
    for group in groups:
        shutil.rmtree(group[0].parent)
    return before, peak, seconds, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-stow", action="store_true")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--serve", nargs=3, metavar=("KIND", "DIR", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        kind, out, port = args.serve
        (serve_crgate if kind == "crgate" else serve_bare)(Path(out), int(port))
        return

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        print("generating 4 full-size phantom mammograms ...", file=sys.stderr)
        files = make_study(work / "study")
        total = sum(p.stat().st_size for p in files)
        count = 2 * (args.repeats + 1)
        sets = [uid_variant(files, k, work / f"set{k}") for k in range(1, count + 1)]
        os.sync()  # inputs on disk before anything is timed
        scp = bench_scps(sets, work, args.repeats)
        for path in (p for s in sets for p in s):
            path.unlink()
        stow = {} if args.skip_stow else bench_stow(files, work, args.repeats)
        rss = None if args.skip_rss else bench_rss(files, work)

    print(
        f"\nIngest of 4 files, {total / MB:.1f} MB in all ({platform.node()}, "
        f"{os.cpu_count()} CPUs, median of {args.repeats})\n"
    )
    print(f"{'receiver':<22} {'associations':<16} {'seconds':>8} {'MB/s':>8} {'crgate is':>10}")
    for (kind, shape), seconds in sorted(scp.items(), key=lambda kv: kv[0][1]):
        ratio = seconds / scp[("crgate SCP", shape)]
        print(f"{kind:<22} {shape:<16} {seconds:8.3f} {total / MB / seconds:8.1f} {ratio:9.2f}x")
    if stow:
        print(f"\n{'receiver':<22} {'requests':<16} {'seconds':>8} {'MB/s':>8} {'vs bare':>10}")
    for shape, seconds in stow.items():
        ratio = scp[("bare pynetdicom", BARE_SHAPE[shape])] / seconds
        mbps = total / MB / seconds
        print(f"{'crgate STOW-RS':<22} {shape:<16} {seconds:8.3f} {mbps:8.1f} {ratio:9.2f}x")
    print(
        "\n'crgate is': crgate SCP's throughput / the row's (targets >= 1.2x dcmtk, >= 0.85x bare)"
    )
    if stow:
        print("'vs bare': STOW-RS throughput / bare pynetdicom's, as many associations, this run")
    if rss is not None:
        before, peak, seconds, size = rss
        print(
            f"\ncrgate serve, 8 associations x 4 files ({size / MB:.0f} MB) at once: "
            f"{seconds:.2f} s ({size / MB / seconds:.0f} MB/s); RSS {before:.0f} MB before, "
            f"peak (VmHWM) {peak:.0f} MB (target < 400)"
        )


if __name__ == "__main__":
    main()
