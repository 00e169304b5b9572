"""Compress jobs against their bare encodes, one run: a 100-slice 512x512 CT series and a
four-view 13.6 MP mammography study, each stored in a fresh data directory (SQLite).

    .venv/bin/python bench/bench_compress.py [--slices 100] [--cr 10] [--syntax j2k] [--views 4]

Rows (same pixels, same process, one after the other):
  bare encodes     the sum over images of one call to the output codec's ``encode`` at the CR
                   (the rate search included; the pixels decoded beforehand): the least any
                   compressor of these images must spend
  compress job     ``runner.run_job`` on a compress job for the stored study: read each file,
                   decode, encode at the CR, decode the copy again and measure PSNR/SSIM/max
                   error, build the derived object and store it through the ingest path (fsync,
                   index row), result row. Target: at most 1.3x the bare encodes.
  images/s         images the job compressed per second of its wall time (one worker process)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_htj2k import ct_slice

from services.core import compress, jobs
from services.core.codecs import OutputSyntax
from services.core.config import Settings
from services.core.contracts import JobTrigger
from services.core.db.tables import Result
from services.core.dicom import results  # noqa: F401  (imported once per worker process)
from services.core.dicom.pixels import load_pixels
from services.core.dicom.uids import new_uid
from services.core.ingest import Channel
from services.core.ratio import CompressionRatio
from services.core.runner import run_job
from services.lab.phantom import generate_study
from services.runtime import build_runtime


def ct_series(slices: int) -> list[Dataset]:
    study, series = new_uid(), new_uid()
    out = []
    for number in range(1, slices + 1):
        ds = ct_slice(seed=number)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.InstanceNumber, ds.PatientID = number, "BENCH-CT"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out


def mammograms(views: int) -> list[Dataset]:
    study = generate_study(0, seed=7)
    return list(study.datasets.values())[:views]


def bare_encodes(datasets: list[Dataset], cr: float, syntax: str) -> float:
    codec = OutputSyntax.for_cr(cr, syntax).codec
    pixels = [load_pixels(ds, "bench") for ds in datasets]
    started = time.perf_counter()
    for p in pixels:
        codec.encode(p.frame_list(), p.layout, cr)
    return time.perf_counter() - started


def compress_job(datasets: list[Dataset], cr: float, syntax: str, folder: Path) -> dict[str, Any]:
    runtime = build_runtime(Settings(data_dir=folder, threads=0), create=True)
    try:
        for ds in datasets:
            staged = runtime.store.new_staging_path()
            ds.save_as(staged, enforce_file_format=True)
            runtime.ingestor.ingest_file(staged, channel=Channel.STOW)
        ((job_request, _),) = compress.prepare(
            runtime.job_context,
            str(datasets[0].StudyInstanceUID),
            cr=CompressionRatio(cr),
            syntax=syntax,
            trigger=JobTrigger.CLI,
            requested_by="bench",
            keep_copy=True,
            may_exceed_ceiling=True,
            reason="benchmark",
            policy_ids=None,
        )
        job, _created = jobs.submit(runtime.sessions, job_request)
        started = time.perf_counter()
        result_id = run_job(runtime.job_context, job.id)
        wall = time.perf_counter() - started
        with runtime.sessions() as session:
            row = session.get(Result, str(result_id))
            assert row is not None, f"job {job.id} failed"
            payload = row.payload
    finally:
        runtime.close()
    return {"wall_s": wall, "summary": payload["summary"], "skipped": payload["skipped"]}


def row(name: str, datasets: list[Dataset], cr: float, syntax: str, folder: Path) -> None:
    bare = bare_encodes(datasets, cr, syntax)
    job = compress_job(datasets, cr, syntax, folder)
    summary = job["summary"]
    assert summary["images"] == len(datasets), job
    print(
        f"| {name} | {syntax} | {len(datasets)} | {bare:.2f} s | {job['wall_s']:.2f} s | "
        f"{job['wall_s'] / bare:.2f}x | {summary['images'] / job['wall_s']:.1f} | "
        f"{summary['achieved_cr']:.2f} | {summary['min_psnr_db']:.1f} dB |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--cr", type=float, default=10)
    parser.add_argument("--mg-cr", type=float, default=25)
    parser.add_argument("--syntax", action="append", help="j2k and/or htj2k (default: both)")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {cpus} CPUs")
    print(
        "| series | syntax | images | bare encodes | compress job | job/bare | images/s | "
        "achieved CR | min PSNR |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ct = ct_series(args.slices)
    mg = mammograms(args.views)
    with tempfile.TemporaryDirectory() as tmp:
        for n, syntax in enumerate(args.syntax or ["j2k", "htj2k"]):
            row(f"CT 512x512 CR {args.cr:g}", ct, args.cr, syntax, Path(tmp) / f"ct{n}")
            row(f"MG 13.6 MP CR {args.mg_cr:g}", mg, args.mg_cr, syntax, Path(tmp) / f"mg{n}")


if __name__ == "__main__":
    main()
