"""Hostile input against a real ``crgate serve``: what each attack costs the server (issue 16).

    PYTHONPATH=. .venv/bin/python bench/bench_hostile.py [--database-url URL] [--tree DIR]

Starts ``crgate serve`` (SQLite in a temporary data directory unless a URL is given) and runs,
in order: the hostile corpus of tests/hostile.py by STOW-RS (one request) and by C-STORE (one
association per file, sent as the bytes are), ``frames/1,1,...`` (5,000 times) and the 1001
distinct frames of a multi-frame instance, a P-DATA PDU declaring 600 MB, and 40 idle TCP
connections while a C-ECHO is timed.
After each step it prints the server's peak RSS so far (VmHWM of the serve process, MB = 10^6
bytes), the HTTP 5xx answers and DICOM statuses seen. Target: peak RSS below 500 MB, no 5xx.
``--tree`` serves another checkout's code (an older crgate) with the same client, for a
before/after table.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pydicom
import pynetdicom
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.core.dicom.multipart import iter_multipart  # noqa: E402
from tests import hostile  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.scp.test_connections import associate_raw  # noqa: E402

BOUNDARY = "bench-hostile"


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmHWM")


def start(
    data_dir: Path, log: Path, database_url: str, tree: Path
) -> tuple[subprocess.Popen[bytes], str, int]:
    http_port, dicom_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRGATE_")}
    env["PYTHONPATH"] = str(tree)
    if database_url:
        env["CRGATE_DATABASE_URL"] = database_url
    command = [sys.executable, "-c", "from services.cli import app; app()", "serve"]
    command += ["--data-dir", str(data_dir), "--http-port", str(http_port)]
    command += ["--dicom-port", str(dicom_port)]
    with log.open("wb") as fh:
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tree)
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url, dicom_port
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.2)


def stow(client: httpx.Client, url: str, files: list[bytes]) -> httpx.Response:
    parts = [({"Content-Type": "application/dicom"}, [d]) for d in files]
    return client.post(
        f"{url}/dicomweb/studies",
        content=b"".join(iter_multipart(parts, BOUNDARY)),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        },
        timeout=300,
    )


def c_store(port: int, path: Path) -> int:
    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, UID(meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="CRGATE")
    if not assoc.is_established:
        return -1
    try:
        status: int = assoc.send_c_store(path).Status
    finally:
        assoc.release()
    return status


def multiframe(frames: int = 1001) -> bytes:
    ds = hostile.image(64, 64, pixels=bytes(64 * 64 * 2 * frames))
    ds.NumberOfFrames = frames
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # multi-frame grayscale word SC
    return hostile.part10(ds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default="")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the crgate checkout to serve")
    args = parser.parse_args()
    pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True
    corpus = hostile.corpus()
    rows: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        log_path = tmp_path / "serve.log"
        proc, url, port = start(tmp_path / "var", log_path, args.database_url, args.tree)
        try:
            key = (tmp_path / "var" / "admin.key").read_text().strip()
            client = httpx.Client(headers={"Authorization": f"Bearer {key}"})
            rows.append(("serve started", "", peak_rss_mb(proc.pid)))

            response = stow(client, url, list(corpus.values()))
            failed = len(response.json().get("00081198", {}).get("Value", []))
            rows.append(
                (
                    f"STOW-RS: {len(corpus)} hostile parts",
                    f"HTTP {response.status_code}, {failed} failed items",
                    peak_rss_mb(proc.pid),
                )
            )

            statuses = []
            for name, data in corpus.items():
                if name == "unknown-transfer-syntax":
                    continue  # no presentation context can carry it
                path = tmp_path / f"{name}.dcm"
                path.write_bytes(data)
                statuses.append(c_store(port, path))
            stored = sum(1 for s in statuses if s == 0)
            rows.append(
                (
                    f"C-STORE: {len(statuses)} hostile data sets",
                    f"{stored} stored, statuses {sorted({hex(s) for s in statuses})}",
                    peak_rss_mb(proc.pid),
                )
            )

            data = multiframe()
            stored = stow(client, url, [data])
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            base = (
                f"{url}/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                f"/instances/{ds.SOPInstanceUID}/frames/"
            )
            octet = {"Accept": 'multipart/related; type="application/octet-stream"'}
            repeated = client.get(base + ",".join(["1"] * 5000), headers=octet, timeout=120)
            distinct = client.get(
                base + ",".join(str(n) for n in range(1, 1002)), headers=octet, timeout=120
            )
            rows.append(
                (
                    "frames/1 x5000; 1001 distinct frames",
                    f"HTTP {repeated.status_code} ({len(repeated.content)} bytes); "
                    f"HTTP {distinct.status_code}",
                    peak_rss_mb(proc.pid),
                )
            )
            answers = [response, stored, repeated, distinct]

            sock = associate_raw(port)
            with sock:
                sock.sendall(struct.pack(">BBL", 4, 0, 600 * 1024 * 1024) + bytes(65536))
                started = time.monotonic()
                try:
                    answer: bytes | None = sock.recv(6)  # b"" (closed) or an A-ABORT
                except TimeoutError:
                    answer = None  # the server is still reading the 600 MB
                except OSError:
                    answer = b""
                waited = time.monotonic() - started
            closed = (
                "still open"
                if answer is None
                else "closed"
                if answer == b""
                else f"answered PDU type {answer[0]}"
            )
            rows.append(
                (
                    "P-DATA PDU declaring 600 MB",
                    f"{closed} after {waited:.2f} s",
                    peak_rss_mb(proc.pid),
                )
            )

            idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
            time.sleep(0.5)
            ae = AE(ae_title="BENCH")
            ae.add_requested_context(Verification)
            started = time.monotonic()
            assoc = ae.associate("127.0.0.1", port, ae_title="CRGATE")
            echo = assoc.send_c_echo().Status if assoc.is_established else None
            if assoc.is_established:
                assoc.release()
            echo_s = time.monotonic() - started
            for s in idle:
                s.close()
            rows.append(
                (
                    "40 idle sockets, then C-ECHO",
                    f"status {echo}, {echo_s:.2f} s",
                    peak_rss_mb(proc.pid),
                )
            )
        finally:
            proc.terminate()
            proc.wait(30)
        log = (tmp_path / "serve.log").read_text(errors="replace")
    leaks = [s for s in hostile.SECRETS if s in log]
    tracebacks = log.count("Traceback")
    errors = sum(1 for r in answers if r.status_code >= 500)
    print(
        f"# crgate serve ({'PostgreSQL' if args.database_url else 'SQLite'}) from {args.tree}, "
        f"hostile corpus of {len(corpus)} files (tests/hostile.py); MB = 10^6 bytes"
    )
    print(f"| {'step':<40} | {'answer':<58} | peak RSS MB |")
    print(f"| {'-' * 40} | {'-' * 58} | ----------- |")
    for step, answer, rss in rows:
        print(f"| {step:<40} | {answer:<58} | {rss:11.0f} |")
    print(
        f"HTTP 5xx: {errors}; patient values in the serve log: {leaks or 'none'}; "
        f"tracebacks in it: {tracebacks}"
    )


if __name__ == "__main__":
    main()
