"""How much of a phantom lesion survives JPEG 2000 at each CR, at two image geometries.

    .venv/bin/python models/recipes/lesion_contrast.py DATA [DATA ...] [--views 12]
        [--crs 1,15,...,11000]

DATA is a `crgate synth` folder (truth.csv gives every lesion's centre and radius in pixels).
For up to ``--views`` malignant views of each folder, every CR is encoded the way training
encodes (services/lab/training/data.py ``quick_encode``), decoded, and measured against the
original:

- bytes per view of the codestream;
- lesion contrast kept: (mean inside the lesion radius - mean of the ring from 1.5 to 2.5
  radii) in the copy, divided by the same in the original (1 = intact, 0 = gone);
- lesion detail kept: the Pearson correlation, inside 2.5 radii, of the copy's and the
  original's high-pass (the image minus its box blur over 2.5 mm, whatever the pixel size):
  spicules and calcifications live there; 1 = every fine structure kept.

Printed as one table per folder (median over the views). docs/cr-study.md uses it to explain
where the phantom experiments part from the seed study.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.ndimage import uniform_filter

from services.core.codecs.openjpeg import decode_codestream
from services.core.dicom.io import read_dataset
from services.core.dicom.pixels import load_pixels
from services.core.ratio import STUDY_CRS_TEXT, parse_cr_list
from services.lab.training.data import quick_encode

F64 = npt.NDArray[np.float64]
DETAIL_MM = 2.5  # the high-pass keeps structures finer than this


def lesion_views(data: Path, limit: int) -> list[tuple[Path, float, float, float]]:
    """(file, centre x, centre y, radius) of up to ``limit`` malignant views."""
    out = []
    with (data / "truth.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["label"] == "malignant" and row["center_x"]:
                out.append(
                    (
                        data / row["file"],
                        float(row["center_x"]),
                        float(row["center_y"]),
                        float(row["radius_px"]),
                    )
                )
    return out[:limit]


def contrast(image: F64, cx: float, cy: float, r: float) -> float:
    yy, xx = np.ogrid[: image.shape[0], : image.shape[1]]
    d = np.hypot(xx - cx, yy - cy)
    inside, ring = image[d <= r], image[(d >= 1.5 * r) & (d <= 2.5 * r)]
    return float(inside.mean() - ring.mean())


def detail(original: F64, copy: F64, cx: float, cy: float, r: float, box: int) -> float:
    yy, xx = np.ogrid[: original.shape[0], : original.shape[1]]
    near = np.hypot(xx - cx, yy - cy) <= 2.5 * r
    a = (original - uniform_filter(original, box))[near]
    b = (copy - uniform_filter(copy, box))[near]
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def measure(file: Path, cx: float, cy: float, r: float, crs: list[float]) -> list[dict[str, Any]]:
    ds = read_dataset(file)
    pixels = load_pixels(ds, str(file))
    frame = pixels.frame_list()[0]
    original = frame.astype(np.float64)
    base = contrast(original, cx, cy, r)
    spacing = float((ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or [0.1])[0])
    box = max(3, round(DETAIL_MM / spacing) | 1)  # odd, covering DETAIL_MM
    rows = []
    for cr in crs:
        if cr == 1:
            copy, size = original, pixels.layout.uncompressed_bytes
        else:
            stream, _ = quick_encode(frame, pixels.layout, cr)
            copy, size = decode_codestream(stream, 1).astype(np.float64), len(stream)
        rows.append(
            {
                "cr": cr,
                "bytes": size,
                "contrast": contrast(copy, cx, cy, r) / base if base else float("nan"),
                "detail": 1.0 if cr == 1 else detail(original, copy, cx, cy, r, box),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+", type=Path)
    parser.add_argument("--views", type=int, default=12)
    parser.add_argument("--crs", default=STUDY_CRS_TEXT)
    args = parser.parse_args()
    crs: list[float] = list(parse_cr_list(args.crs, "--crs"))
    for data in args.data:
        views = lesion_views(data, args.views)
        if not views:
            raise SystemExit(f"error: {data}: no malignant view with a lesion in truth.csv")
        per_view = [measure(f, x, y, r, crs) for f, x, y, r in views]
        ds = read_dataset(views[0][0])
        radius = statistics.median(r for *_, r in views)
        print(
            f"{data}: {ds.Columns}x{ds.Rows}, {len(views)} malignant views, "
            f"median lesion radius {radius:.0f} px"
        )
        print(f"{'CR':>7} {'bytes/view':>11} {'contrast kept':>14} {'detail kept':>12}")
        for i, cr in enumerate(crs):
            column = [v[i] for v in per_view]
            print(
                f"{cr:>7g} {statistics.median(c['bytes'] for c in column):>11.0f} "
                f"{statistics.median(c['contrast'] for c in column):>14.2f} "
                f"{statistics.median(c['detail'] for c in column):>12.2f}"
            )


if __name__ == "__main__":
    main()
