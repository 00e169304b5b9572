"""HTJ2K next to JPEG 2000 on the same images, one run: a 13.6 MP 12-bit mammogram and a
512x512 CT slice.

    .venv/bin/python bench/bench_htj2k.py [--cr 25] [--repeats 3] [--threads N]

Rows (median wall time of the repeats, same pixels):
  full transcode        what `crgate transcode --syntax htj2k|j2k` does: decode input, search
                        the step / rate to the CR, encapsulate, decode the output, PSNR, SSIM,
                        max error. Target: HTJ2K at least 5x faster, CR within 2 %.
  HT encode vs ojph     one HT encode at the step the search found, crgate (imagecodecs'
                        OpenJPH, precision = Bits Stored) against Debian's `ojph_compress`
                        (whole process, 16-bit PGM with maxval 4095 or PGM of the CT window)
  lossless              HTJ2K lossless (OpenJPH, reversible) against OpenJPEG lossless: bytes
                        and time
  decode                the HT copy at the CR against the JPEG 2000 copy at the CR, both
                        through OpenJPEG (crgate's decoder), and the HT copy through OpenJPH
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
from typing import Any

import imagecodecs
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from services.core.codecs import htj2k, jpeg2000
from services.core.codecs.openjpeg import decode_codestream, openjpeg_version
from services.core.dicom.pixels import load_pixels
from services.core.pipeline import TranscodeResult, transcode_dataset
from services.core.ratio import CompressionRatio
from services.lab.phantom import PhantomConfig, generate_study


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ct_slice(size: int = 512, seed: int = 3) -> Dataset:
    """A 512x512 signed 16-bit (12 bits stored) CT-like slice: air, body, bone, noise."""
    from services.core.dicom.uids import new_uid

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size - 0.5
    hu = np.full((size, size), -1000.0)
    body = (x / 0.42) ** 2 + (y / 0.33) ** 2 < 1
    hu[body] = 40 + 15 * np.sin(x[body] * 40)
    hu[(x / 0.3) ** 2 + (y / 0.22) ** 2 < 1] = 10  # soft tissue
    hu[((x - 0.1) / 0.04) ** 2 + (y / 0.05) ** 2 < 1] = 900  # bone
    hu += rng.normal(0, 12, hu.shape) * body
    pixels = np.clip(np.rint(hu + 1024), 0, 4095).astype(np.int16) - 1024
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = new_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = new_uid(), new_uid()
    ds.Modality = "CT"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 1
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_pgm(path: Path, frame: np.ndarray[Any, Any], maxval: int) -> None:
    rows, cols = frame.shape
    header = f"P5\n{cols} {rows}\n{maxval}\n".encode()
    path.write_bytes(header + frame.astype(">u2").tobytes())


def bench_image(name: str, ds: Dataset, cr: float, repeats: int, threads: int, tmp: Path) -> None:
    pixels = load_pixels(ds, name)
    layout = pixels.layout
    frame = pixels.frame_list()[0]
    target = CompressionRatio(cr)
    results: dict[str, Any] = {}
    for syntax in ("htj2k", "j2k"):

        def transcode(syntax: str = syntax) -> TranscodeResult:
            return transcode_dataset(ds, cr=target, syntax=syntax, threads=threads)

        results[syntax] = transcode()
        results[f"{syntax} s"] = median_seconds(transcode, repeats)
    ht, j2k = results["htj2k"], results["j2k"]
    print(f"## {name}: {layout.columns}x{layout.rows}, {layout.bits_stored} bits stored, CR {cr:g}")
    print(f"{'full transcode':<34}{'seconds':>9}{'CR':>9}{'PSNR dB':>9}{'encodes':>8}")
    for syntax, result in (("HTJ2K", ht), ("JPEG 2000", j2k)):
        key = "htj2k s" if syntax == "HTJ2K" else "j2k s"
        print(
            f"{syntax:<34}{results[key]:>9.3f}{result.achieved_cr:>9.2f}"
            f"{result.psnr_db:>9.2f}{result.encode_attempts:>8}"
        )
    print(
        f"HTJ2K is {results['j2k s'] / results['htj2k s']:.1f}x faster; "
        f"PSNR {ht.psnr_db - j2k.psnr_db:+.2f} dB against JPEG 2000"
    )

    # one HT encode at the step the search found, crgate against ojph_compress
    encoded = htj2k.encode_image([frame], layout, target, lossless=False)
    assert encoded.step is not None
    step = encoded.step
    params = htj2k.HTParams(layout.bits_stored, layout.signed, False, step)
    ours = median_seconds(lambda: htj2k.encode_frame(frame, params), repeats)
    ours_bytes = len(htj2k.encode_frame(frame, params))
    ojph = shutil.which("ojph_compress")
    print(f"{'one HT encode at step ' + f'{step:.4g}':<34}{'seconds':>9}{'bytes':>11}")
    print(f"{'crgate (imagecodecs OpenJPH)':<34}{ours:>9.3f}{ours_bytes:>11}")
    if ojph and not layout.signed:
        pgm, out = tmp / f"{name}.pgm", tmp / f"{name}.j2c"
        write_pgm(pgm, frame, (1 << layout.bits_stored) - 1)
        command = [ojph, "-i", str(pgm), "-o", str(out), "-qstep", f"{step}"]
        theirs = median_seconds(
            lambda: subprocess.run(command, check=True, capture_output=True), repeats
        )
        print(f"{'ojph_compress (process, PGM)':<34}{theirs:>9.3f}{out.stat().st_size:>11}")
    elif ojph:
        print("ojph_compress: skipped (its PGM input cannot carry signed samples)")

    # lossless
    ht_lossless = htj2k.encode_image([frame], layout, 1, lossless=True)
    j2k_lossless = jpeg2000.encode_image([frame], layout, 1, lossless=True, threads=threads)
    ht_time = median_seconds(lambda: htj2k.encode_image([frame], layout, 1, lossless=True), repeats)
    j2k_time = median_seconds(
        lambda: jpeg2000.encode_image([frame], layout, 1, lossless=True, threads=threads), repeats
    )
    print(f"{'lossless encode':<34}{'seconds':>9}{'bytes':>11}")
    print(f"{'HTJ2K lossless (OpenJPH)':<34}{ht_time:>9.3f}{ht_lossless.compressed_bytes:>11}")
    print(
        f"{'JPEG 2000 lossless (OpenJPEG)':<34}{j2k_time:>9.3f}{j2k_lossless.compressed_bytes:>11}"
    )

    # decode of the copies at the CR
    ht_cs = encoded.frames[0]
    j2k_cs = jpeg2000.encode_image([frame], layout, target, lossless=False, threads=threads).frames[
        0
    ]
    rows = {
        "HT copy, OpenJPEG": lambda: decode_codestream(ht_cs, threads),
        "HT copy, OpenJPH": lambda: imagecodecs.htj2k_decode(ht_cs),
        "JPEG 2000 copy, OpenJPEG": lambda: decode_codestream(j2k_cs, threads),
    }
    print(f"{'decode at CR ' + f'{cr:g}':<34}{'seconds':>9}")
    for label, fn in rows.items():
        print(f"{label:<34}{median_seconds(fn, repeats):>9.3f}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cr", type=float, default=25.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    study = generate_study(
        0, seed=7, config=PhantomConfig(), malignant_fraction=1.0, benign_fraction=0.0
    )
    print(
        f"# median of {args.repeats}, {args.threads} thread(s); OpenJPEG {openjpeg_version()} "
        f"(encode, glymur), imagecodecs {imagecodecs.__version__} (OpenJPH "
        f"{imagecodecs.htj2k_version()}, OpenJPEG {imagecodecs.jpeg2k_version()} decode); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(prefix="crgate-bench-") as tmp:
        bench_image(
            "mammogram LCC", study.datasets["LCC"], args.cr, args.repeats, args.threads, Path(tmp)
        )
        bench_image("CT slice", ct_slice(), args.cr, args.repeats, args.threads, Path(tmp))


if __name__ == "__main__":
    main()
