"""Phantom training data: breasts from a `crgate synth` folder, splits by patient, and the
compressed-copy cache (keyed by image and CR) that training and the CR study share.

Compressed copies for the cache use the service's rate search
(:func:`~services.core.codecs.jpeg2000.encode_image`) with looser settings,
:data:`QUICK_SEARCH`: one OpenJPEG encode at the rate the arithmetic predicts (64 x 64 code
blocks), corrected by log-space secant steps only while the achieved CR is more than
:data:`QUICK_TOLERANCE` from the target, at most :data:`QUICK_ATTEMPTS` encodes. The service's
own settings (2 %, smaller code blocks for small budgets) need up to ten encodes per image at
CR 10 000 on small phantoms; training and the card's test rows do not need that precision, and
the achieved CR of every copy is kept (the card reports its mean per test CR). Each view is read
and decoded once for all the CRs it needs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.core import metrics
from services.core.codecs.image import PixelLayout
from services.core.codecs.jpeg2000 import RateSearch, encode_image
from services.core.codecs.openjpeg import decode_codestream
from services.core.dicom.io import atomic_output, read_dataset
from services.core.dicom.pixels import load_pixels
from services.core.errors import InvalidInput, NotFound
from services.core.inference.preprocess import Preprocessing, breast_input, prepare_view
from services.lab.pools import process_pool

MALIGNANT = "malignant"
QUICK_TOLERANCE = 0.05
QUICK_ATTEMPTS = 3
QUICK_CODEBLOCK = 64
QUICK_SEARCH = RateSearch(QUICK_TOLERANCE, QUICK_ATTEMPTS, (QUICK_CODEBLOCK,), greedy=True)
ENCODER_TAG = f"quick-{QUICK_TOLERANCE:g}-{QUICK_ATTEMPTS}-cb{QUICK_CODEBLOCK}"
# Parameters that change a view's crop (the padding and the gap between views do not).
_CROP_KEYS = (
    "view_rows",
    "view_cols",
    "crop_fraction_cc_bottom",
    "crop_fraction_mlo_top",
    "keep_width_fraction",
    "mirror_right",
    "resample",
)


@dataclass(frozen=True)
class BreastRecord:
    patient_id: str
    study_uid: str
    laterality: str
    label: int  # 1 malignant, 0 benign or normal
    kind: str  # lesion kind
    files: dict[str, Path]  # "CC"/"MLO" -> file


def load_breasts(data_dir: Path) -> list[BreastRecord]:
    """Breasts of a `crgate synth` folder, from its truth.csv (one row per view)."""
    truth = data_dir / "truth.csv"
    if not truth.is_file():
        raise NotFound(f"{truth} not found: make the data with `crgate synth --out-dir {data_dir}`")
    grouped: dict[tuple[str, str], dict[str, str]] = {}
    files: dict[tuple[str, str], dict[str, Path]] = {}
    with truth.open(newline="") as fh:
        for row in csv.DictReader(fh):
            key = (row["study_uid"], row["laterality"])
            grouped.setdefault(key, row)
            files.setdefault(key, {})[row["view"]] = data_dir / row["file"]
    records = []
    for (study, lat), row in sorted(grouped.items()):
        views = files[(study, lat)]
        if set(views) != {"CC", "MLO"}:
            raise InvalidInput(f"{truth}: study {study} breast {lat} lacks a CC or MLO row")
        records.append(
            BreastRecord(
                patient_id=row["patient_id"],
                study_uid=study,
                laterality=lat,
                label=int(row["label"] == MALIGNANT),
                kind=row["lesion_kind"],
                files=views,
            )
        )
    return records


def split_by_patient(
    records: Sequence[BreastRecord],
    seed: int,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
) -> tuple[list[BreastRecord], list[BreastRecord], list[BreastRecord]]:
    """Train / validation / test (7:1:2 by default), never splitting a patient."""
    patients = sorted({r.patient_id for r in records})
    order = np.random.default_rng(seed).permutation(len(patients))
    n_train = round(fractions[0] * len(patients))
    n_val = round(fractions[1] * len(patients))
    group = {}
    for rank, i in enumerate(order):
        group[patients[i]] = 0 if rank < n_train else 1 if rank < n_train + n_val else 2
    parts: tuple[list[BreastRecord], list[BreastRecord], list[BreastRecord]] = ([], [], [])
    for r in records:
        parts[group[r.patient_id]].append(r)
    return parts


def folds_by_patient(
    records: Sequence[BreastRecord], k: int, seed: int
) -> list[list[BreastRecord]]:
    """``k`` disjoint folds of whole patients."""
    patients = sorted({r.patient_id for r in records})
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of = {patients[i]: rank % k for rank, i in enumerate(order)}
    folds: list[list[BreastRecord]] = [[] for _ in range(k)]
    for r in records:
        folds[fold_of[r.patient_id]].append(r)
    return folds


Pair = tuple[BreastRecord, float]  # a breast and the CR its views are compressed at


def training_pairs(
    records: Sequence[BreastRecord], crs: Sequence[float], lossy_copies: int, seed: int
) -> list[Pair]:
    """The training mixture: every breast at each CR of ``crs`` (``lossy_copies`` 0), or the
    original (when 1 is in ``crs``) plus ``lossy_copies`` of the other CRs drawn per breast."""
    crs = list(dict.fromkeys(float(c) for c in crs))
    lossy = [c for c in crs if c != 1.0]
    pairs: list[Pair] = [(r, 1.0) for r in records] if 1.0 in crs else []
    if lossy_copies <= 0 or lossy_copies >= len(lossy):
        return pairs + [(r, c) for c in lossy for r in records]
    rng = np.random.default_rng(seed)
    for r in records:
        for i in sorted(rng.choice(len(lossy), size=lossy_copies, replace=False)):
            pairs.append((r, lossy[int(i)]))
    return pairs


@dataclass(frozen=True)
class Prepared:
    """One view, preprocessed, after compression at ``cr`` (1 = the original pixels)."""

    crop: npt.NDArray[np.float16]
    achieved_cr: float
    psnr_db: float


def quick_encode(frame: npt.NDArray[Any], layout: PixelLayout, cr: float) -> tuple[bytes, float]:
    """One codestream near ``cr`` (:data:`QUICK_SEARCH`, one thread) and the CR it achieved."""
    encoded = encode_image([frame], layout, cr, lossless=False, threads=1, search=QUICK_SEARCH)
    return encoded.frames[0], encoded.achieved_cr


def prepare_copies(
    file: Path, view: str, laterality: str, crs: Sequence[float], params: Preprocessing
) -> list[Prepared]:
    """The view in ``file`` at each CR of ``crs``, read and decoded once."""
    ds = read_dataset(file)
    pixels = load_pixels(ds, str(file))
    original = pixels.frames[0]
    out = []
    for cr in crs:
        if cr == 1:
            image, achieved, psnr = original, 1.0, metrics.EXACT_COPY_PSNR_DB
        else:
            stream, achieved = quick_encode(original, pixels.layout, cr)
            image = decode_codestream(stream, 1)
            psnr = metrics.psnr(original, image, pixels.layout.bits_stored)
        crop = prepare_view(
            image,
            view,
            laterality,
            params,
            bits_stored=pixels.layout.bits_stored,
            photometric=pixels.photometric,
        )
        out.append(Prepared(crop.astype(np.float16), float(achieved), float(psnr)))
    return out


class CompressedCache:
    """Preprocessed views of compressed copies on disk, keyed by image, CR, the crop geometry
    and the encoder settings. A second run (or another experiment) with the same images and CRs
    recompresses nothing."""

    def __init__(self, root: Path, params: Preprocessing) -> None:
        self.root = root
        self.params = params
        crop = {k: v for k, v in params.as_dict().items() if k in _CROP_KEYS}
        blob = json.dumps({**crop, "encoder": ENCODER_TAG}, sort_keys=True).encode()
        self.params_key = hashlib.sha256(blob).hexdigest()[:12]

    def path(self, file: Path, cr: float) -> Path:
        key = hashlib.sha256(f"{file.resolve()}|{file.stat().st_size}".encode()).hexdigest()[:24]
        return self.root / key[:2] / f"{key}-{self.params_key}-cr{cr:g}.npz"

    def load(self, file: Path, cr: float) -> Prepared | None:
        path = self.path(file, cr)
        if not path.is_file():
            return None
        with np.load(path) as data:
            return Prepared(data["crop"], float(data["cr"]), float(data["psnr"]))

    def fill(self, file: Path, view: str, laterality: str, crs: Sequence[float]) -> int:
        """Compress and store the copies of ``crs`` not yet cached; returns how many CRs."""
        missing = [cr for cr in crs if not self.path(file, cr).is_file()]
        if missing:
            for cr, prepared in zip(
                missing, prepare_copies(file, view, laterality, missing, self.params), strict=True
            ):
                self._store(file, cr, prepared)
        return len(crs)

    def get(self, file: Path, view: str, laterality: str, cr: float) -> Prepared:
        found = self.load(file, cr)
        if found is not None:
            return found
        (prepared,) = prepare_copies(file, view, laterality, [cr], self.params)
        self._store(file, cr, prepared)
        return prepared

    def _store(self, file: Path, cr: float, prepared: Prepared) -> None:
        path = self.path(file, cr)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as fh:
            np.savez(fh, crop=prepared.crop, cr=prepared.achieved_cr, psnr=prepared.psnr_db)


_WORKER_CACHE: CompressedCache | None = None


def _init_worker(root: Path, params: Preprocessing) -> None:
    global _WORKER_CACHE
    _WORKER_CACHE = CompressedCache(root, params)


def _work(job: tuple[Path, str, str, tuple[float, ...]]) -> int:
    assert _WORKER_CACHE is not None
    return _WORKER_CACHE.fill(*job)


def fill_cache(
    pairs: Sequence[Pair],
    cache: CompressedCache,
    *,
    workers: int = 0,
    on_done: Callable[[int], None] | None = None,
) -> None:
    """Make sure every view of ``pairs`` is cached at its CR: one job per view with all of its
    CRs, in ``workers`` processes (default: every core), one OpenJPEG thread each."""
    wanted: dict[tuple[Path, str, str], list[float]] = {}
    for record, cr in pairs:
        for view in ("CC", "MLO"):
            crs = wanted.setdefault((record.files[view], view, record.laterality), [])
            if cr not in crs:
                crs.append(cr)
    jobs = [(f, v, lat, tuple(crs)) for (f, v, lat), crs in wanted.items()]
    workers = workers or len(os.sched_getaffinity(0))
    with process_pool(workers, _init_worker, (cache.root, cache.params)) as pool:
        for done in pool.map(_work, jobs, chunksize=2):
            if on_done:
                on_done(done)


@dataclass(frozen=True)
class Inputs:
    """Model inputs [N, 1, H, W] (float16), labels, and per breast the mean PSNR and CR of its
    two views."""

    x: npt.NDArray[np.float16]
    y: npt.NDArray[np.float32]
    psnr: npt.NDArray[np.float32]
    achieved_cr: npt.NDArray[np.float32]


def load_inputs(pairs: Sequence[Pair], cache: CompressedCache) -> Inputs:
    """The breast inputs of ``pairs`` from the cache (computing any copy that is missing)."""
    height, width = cache.params.input_shape
    x = np.empty((len(pairs), 1, height, width), dtype=np.float16)
    psnr = np.empty(len(pairs), dtype=np.float32)
    achieved = np.empty(len(pairs), dtype=np.float32)
    for i, (record, cr) in enumerate(pairs):
        cc, mlo = (cache.get(record.files[v], v, record.laterality, cr) for v in ("CC", "MLO"))
        x[i] = breast_input(cc.crop, mlo.crop, cache.params)
        psnr[i] = (cc.psnr_db + mlo.psnr_db) / 2
        achieved[i] = (cc.achieved_cr + mlo.achieved_cr) / 2
    y = np.array([r.label for r, _ in pairs], dtype=np.float32)
    return Inputs(x, y, psnr, achieved)


def prepare_pairs(
    pairs: Sequence[Pair],
    cache: CompressedCache,
    *,
    workers: int = 0,
    on_done: Callable[[int], None] | None = None,
) -> Inputs:
    """:func:`fill_cache` then :func:`load_inputs`."""
    fill_cache(pairs, cache, workers=workers, on_done=on_done)
    return load_inputs(pairs, cache)
