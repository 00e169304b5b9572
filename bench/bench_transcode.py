"""crgate's full transcode next to bare OpenJPEG on the same 13.6 MP 12-bit mammogram, one run.

    .venv/bin/python bench/bench_transcode.py [--cr 25] [--repeats 5] [--threads N]

Rows (median wall time of the repeats, same pixels, same thread count):
  crgate transcode        decode input + encode to CR (with rate correction) + encapsulate +
                          decode output + PSNR + SSIM + max error: what `crgate transcode` does
  crgate encode only      crgate's OpenJPEG call (low-level API, precision = Bits Stored)
  glymur Jp2k encode      glymur's high-level writer (declares 16 bits; ratio relative to 16 bits)
  opj_compress CLI        Debian libopenjp2-tools, whole process, PGX input, -threads N
Ratios are against glymur's bare encode: the target is crgate transcode <= 1.15x.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import glymur
import numpy as np

from services.core.codecs.openjpeg import EncodeParams, encode_frame, openjpeg_version
from services.core.pipeline import transcode_dataset
from services.lab.phantom import PhantomConfig, generate_study


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: page cache, library loading
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_pgx(path: Path, frame: np.ndarray, bits: int) -> None:
    rows, cols = frame.shape
    with path.open("wb") as fh:
        fh.write(f"PG ML + {bits} {cols} {rows}\n".encode())
        fh.write(frame.astype(">u2").tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cr", type=float, default=25.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    cr, threads = args.cr, args.threads

    subtle = PhantomConfig.from_overrides({}, preset="subtle")  # as when BENCHMARKS.md was measured
    study = generate_study(0, seed=7, config=subtle, malignant_fraction=1.0, benign_fraction=0.0)
    ds = study.datasets["LCC"]
    frame = ds.pixel_array
    rows, cols = frame.shape
    glymur.set_option("lib.num_threads", threads)
    results: dict[str, float] = {}
    sizes: dict[str, int] = {}

    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)

        def crgate_full() -> None:
            result = transcode_dataset(ds, cr=cr, threads=threads)
            sizes["crgate transcode"] = result.bytes_out

        def crgate_encode() -> None:
            params = EncodeParams(12, False, reversible=False, rate=cr * 12 / 16, threads=threads)
            sizes["crgate encode only"] = len(encode_frame(frame, params))

        def glymur_encode() -> None:
            out = tmpdir / "glymur.j2k"
            out.unlink(missing_ok=True)
            glymur.Jp2k(str(out), data=frame, cratios=[cr], irreversible=True)
            sizes["glymur Jp2k encode"] = out.stat().st_size

        results["crgate transcode"] = median_seconds(crgate_full, args.repeats)
        results["crgate encode only"] = median_seconds(crgate_encode, args.repeats)
        results["glymur Jp2k encode"] = median_seconds(glymur_encode, args.repeats)

        opj = shutil.which("opj_compress")
        if opj:
            pgx = tmpdir / "in.pgx"
            write_pgx(pgx, frame, 12)
            out = tmpdir / "opj.j2k"
            command = [opj, "-i", str(pgx), "-o", str(out), "-I", "-r", f"{cr * 12 / 16}"]
            command += ["-threads", str(threads)]

            def opj_compress() -> None:
                subprocess.run(command, check=True, capture_output=True)
                sizes["opj_compress CLI"] = out.stat().st_size

            results["opj_compress CLI"] = median_seconds(opj_compress, args.repeats)

    reference = results["glymur Jp2k encode"]
    print(
        f"# {rows}x{cols} 12-bit phantom (LCC, seed 7), target CR {cr:g}, {threads} thread(s), "
        f"median of {args.repeats}; OpenJPEG {openjpeg_version()}, glymur {glymur.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"{'what':<22} {'seconds':>8} {'x glymur':>9} {'CR':>8}")
    uncompressed = frame.size * 2
    for name, seconds in results.items():
        ratio = uncompressed / sizes[name]
        print(f"{name:<22} {seconds:8.3f} {seconds / reference:9.2f} {ratio:8.2f}")


if __name__ == "__main__":
    main()
