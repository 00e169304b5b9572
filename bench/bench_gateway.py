"""Ingest to forwarded: a 100-slice CT series pushed into crgate, compressed by its policy and
forwarded to a PACS, against the same series pushed straight to that PACS, one run.

    PYTHONPATH=. .venv/bin/python bench/bench_gateway.py [--slices 100] [--cr 10]

crgate is assembled as `crgate serve` does (in-process jobs and forwards, SQLite, housekeeping
every 0.5 s) with its SCP; the PACS is dcmtk's `storescp +xa` (it accepts JPEG 2000). A CT
policy (`auto_compress`, CR 10, `expected_instances` = the slice count, forward the compressed
copies) acts when the last slice arrives. The series is sent by pynetdicom on one association.
Rows: the push into crgate (C-STORE of every slice, acknowledged), then from the last
acknowledgement until the compress job finished and until the PACS held every copy; and the
reference: the same series C-STOREd straight to the PACS (uncompressed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_compress import ct_series

from services.core.config import Settings
from services.core.db.tables import Job
from services.core.destinations import DestinationSpec, create_destination
from services.core.policies import PolicyKey, set_policy
from services.runtime import build_runtime
from services.runtime.assembly import start_scp
from tests.conftest import free_port

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def push(port: int, called: str, datasets: list[Dataset]) -> float:
    """C-STORE every dataset on one association; seconds until the last was acknowledged."""
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(CT_IMAGE, EXPLICIT_LE)
    started = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, f"no association with {called}"
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0, status
    finally:
        assoc.release()
    return time.perf_counter() - started


def files_in(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--cr", type=float, default=10)
    args = parser.parse_args()
    series = ct_series(args.slices)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pacs_port, received = free_port(), root / "pacs"
        received.mkdir()
        pacs = subprocess.Popen(
            ["storescp", "+xa", "-aet", "PACS", "-od", str(received), str(pacs_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        try:
            direct = push(pacs_port, "PACS", series)
            for path in received.iterdir():
                path.unlink()
            settings = Settings(
                data_dir=root / "var",
                database_url=f"sqlite:///{root / 'index.db'}",
                dicom_port=free_port(),
                arrival_sweep_seconds=0.5,
            )
            runtime = build_runtime(settings, create=True)
            scp = start_scp(runtime)
            try:
                with runtime.sessions.begin() as session:
                    create_destination(
                        session,
                        DestinationSpec("pacs", "PACS", "127.0.0.1", pacs_port),
                        actor="bench",
                    )
                    set_policy(
                        session,
                        PolicyKey.of("CT"),
                        {
                            "cr": args.cr,
                            "auto_compress": True,
                            "expected_instances": args.slices,
                            "forward_to": ["pacs"],
                            "forward_what": ["compressed"],
                        },
                        actor="bench",
                    )
                stored = push(settings.dicom_port, "CRGATE", series)
                acknowledged = time.perf_counter()
                job_done = None
                while files_in(received) < args.slices:
                    if job_done is None:
                        with runtime.sessions() as session:
                            job = session.scalars(select(Job)).first()
                            if job is not None and job.status == "succeeded":
                                job_done = time.perf_counter() - acknowledged
                    if time.perf_counter() - acknowledged > 600:
                        raise RuntimeError(f"{files_in(received)} of {args.slices} forwarded")
                    time.sleep(0.05)
                forwarded = time.perf_counter() - acknowledged
            finally:
                scp.shutdown()
                runtime.close()
        finally:
            pacs.terminate()
            pacs.wait(10)
    print(
        f"| CT {args.slices} x 512x512, CR {args.cr:g} | {direct:.2f} s | {stored:.2f} s | "
        f"{job_done if job_done is not None else float('nan'):.2f} s | {forwarded:.2f} s | "
        f"{(stored + forwarded) / direct:.1f}x |"
    )


if __name__ == "__main__":
    main()
