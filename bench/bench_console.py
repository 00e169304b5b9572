"""The console's study page: one image's panes as PNGs at a pane's size, before and after the
frame cache and the lookup-table windowing, next to dcmtk's `dcm2pnm`, same files, one run.

    .venv/bin/python bench/bench_console.py [--repeats 5] [--viewport 420,520]

A phantom mammogram (3328x4096, 12 bits) and its JPEG 2000 copy at CR 25, as the console shows
them: the original pane, the copy pane, then both again zoomed (viewport with a source region),
as a user does. Rows are median wall times of the repeats:
  before       each pane decoded, windowed pixel by pixel in float, resized with Lanczos
               (what render did until 2026-12-05)
  after        crgate's render with the console's FrameCache (a fresh cache per repeat: the
               first pane of each file decodes, the zoomed ones reuse it)
  dcm2pnm      dcmtk, min-max window, scaled to the pane width, PNG out (the original only:
               Debian's dcmtk has no JPEG 2000 decoder); a whole process per pane
The PNG bytes of "before" and "after" are compared by their pixels (mean absolute difference on
0..255: only the resize differs; the windowing is byte-identical by test).
"""

from __future__ import annotations

import argparse
import io
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from services.core.dicom.mediatype import PNG
from services.core.pipeline import transcode_file
from services.core.ratio import CompressionRatio
from services.core.retrieve.framecache import FrameCache
from services.core.retrieve.frames import decode
from services.core.retrieve.lookup import StoredInstance, read_instance
from services.core.retrieve.rendering import RenderParams, parse_render_params, render
from services.core.retrieve.windowing import grey_to_unit
from services.lab.phantom import PhantomConfig, generate_study


def before(instance: StoredInstance, params: RenderParams) -> bytes:
    """render as it was: decode, float windowing, Lanczos from the full size."""
    ds = read_instance(instance)
    unit = grey_to_unit(ds, decode(ds, 0, instance.source), params.window)
    image = Image.fromarray(np.round(unit * 255).astype(np.uint8))
    if params.region is not None:
        sx, sy, sw, sh = params.region
        image = image.crop((sx, sy, sx + sw, sy + sh))
    if params.viewport is not None:
        w, h = params.viewport
        scale = min(w / image.width, h / image.height)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def median(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--viewport", default="420,520")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        study = generate_study(0, seed=11, config=PhantomConfig())
        original_path = folder / "LCC.dcm"
        study.datasets["LCC"].save_as(original_path, enforce_file_format=True)
        copy_path = folder / "copy.dcm"
        transcode_file(original_path, copy_path, cr=CompressionRatio(25))
        original = StoredInstance("", "", "o", "", original_path, 1, True)
        copy = StoredInstance("", "", "c", "", copy_path, 1, True)
        w, h = (int(v) for v in args.viewport.split(","))
        full = parse_render_params(PNG, viewport=f"{w},{h}")
        zoom = parse_render_params(PNG, viewport=f"{w},{h},800,1200,832,1024")
        panes = [(original, full), (copy, full), (original, zoom), (copy, zoom)]

        def old() -> list[bytes]:
            return [before(i, p) for i, p in panes]

        def new() -> list[bytes]:
            cache = FrameCache(256 << 20)
            return [render(i, 1, p, cache) for i, p in panes]

        old_pngs, new_pngs = old(), new()
        diffs = [
            float(np.abs(pixels(a) - pixels(b)).mean())
            for a, b in zip(old_pngs, new_pngs, strict=True)
        ]
        t_old, t_new = median(old, args.repeats), median(new, args.repeats)
        dcm2pnm = shutil.which("dcm2pnm")
        t_dcmtk = None
        if dcm2pnm:
            command = [dcm2pnm, "--write-png", "+Wm", "+Sxv", str(w), str(original_path),
                       str(folder / "o.png")]  # fmt: skip
            t_dcmtk = median(lambda: subprocess.run(command, check=True), args.repeats)
        one_old = median(lambda: before(original, full), args.repeats)
        one_new = median(lambda: render(original, 1, full, FrameCache(0)), args.repeats)
        print(f"# console panes, {platform.node()}, {args.repeats} repeats, viewport {w}x{h}")
        print("| what | before | after | ratio |")
        print("| --- | --- | --- | --- |")
        print(f"| 4 panes (original, copy, both zoomed) | {t_old:.3f} s | {t_new:.3f} s | "
              f"{t_old / t_new:.1f}x |")  # fmt: skip
        print(f"| original pane alone, no cache | {one_old:.3f} s | {one_new:.3f} s | "
              f"{one_old / one_new:.1f}x |")  # fmt: skip
        if t_dcmtk is not None:
            print(f"| dcm2pnm, original pane (whole process) | | {t_dcmtk:.3f} s | "
                  f"dcm2pnm / ours {t_dcmtk / one_new:.2f} |")  # fmt: skip
        print(f"mean |before - after| per pane (0..255): {', '.join(f'{d:.2f}' for d in diffs)}")


if __name__ == "__main__":
    main()
