"""Phantom training data: breasts from a `crgate synth` folder, splits by patient, and the
compressed-copy cache (keyed by image and CR) that training and the CR study share."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from services.core import metrics
from services.core.codecs.jpeg2000 import encode_image
from services.core.dicom.io import atomic_output, read_dataset
from services.core.dicom.pixels import load_pixels
from services.core.errors import InvalidInput, NotFound
from services.core.inference.preprocess import Preprocessing, breast_input, prepare_view
from services.core.pipeline import decode_frames

MALIGNANT = "malignant"


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


@dataclass(frozen=True)
class Prepared:
    """One view, preprocessed, after compression at ``cr`` (1 = the original pixels)."""

    crop: npt.NDArray[np.float16]
    achieved_cr: float
    psnr_db: float


class CompressedCache:
    """Preprocessed views of compressed copies on disk, keyed by image, CR and preprocessing.

    A second run (or another experiment) with the same images and CRs recompresses nothing.
    """

    def __init__(self, root: Path, params: Preprocessing) -> None:
        self.root = root
        self.params = params
        blob = json.dumps(params.as_dict(), sort_keys=True).encode()
        self.params_key = hashlib.sha256(blob).hexdigest()[:12]

    def path(self, file: Path, cr: float) -> Path:
        key = hashlib.sha256(f"{file.resolve()}|{file.stat().st_size}".encode()).hexdigest()[:24]
        return self.root / key[:2] / f"{key}-{self.params_key}-cr{cr:g}.npz"

    def get(self, file: Path, view: str, laterality: str, cr: float) -> Prepared:
        path = self.path(file, cr)
        if path.is_file():
            with np.load(path) as data:
                return Prepared(data["crop"], float(data["cr"]), float(data["psnr"]))
        prepared = compress_and_prepare(file, view, laterality, cr, self.params)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as fh:
            np.savez(fh, crop=prepared.crop, cr=prepared.achieved_cr, psnr=prepared.psnr_db)
        return prepared


def compress_and_prepare(
    file: Path, view: str, laterality: str, cr: float, params: Preprocessing, threads: int = 1
) -> Prepared:
    ds = read_dataset(file)
    pixels = load_pixels(ds, str(file))
    original = pixels.frames[0]
    if cr == 1:
        image, achieved, psnr = original, 1.0, metrics.EXACT_COPY_PSNR_DB
    else:
        encoded = encode_image(
            pixels.frame_list(), pixels.layout, cr, lossless=False, threads=threads
        )
        image = decode_frames(encoded.frames, threads)[0]
        achieved = encoded.achieved_cr
        psnr = metrics.psnr(original, image, pixels.layout.bits_stored)
    crop = prepare_view(
        image,
        view,
        laterality,
        params,
        bits_stored=pixels.layout.bits_stored,
        photometric=pixels.photometric,
    )
    return Prepared(crop.astype(np.float16), achieved, psnr)


_WORKER_CACHE: CompressedCache | None = None


def _init_worker(root: Path, params: Preprocessing) -> None:
    global _WORKER_CACHE
    _WORKER_CACHE = CompressedCache(root, params)


def _work(job: tuple[Path, str, str, float]) -> Prepared:
    assert _WORKER_CACHE is not None
    return _WORKER_CACHE.get(*job)


def prepare_all(
    records: Sequence[BreastRecord],
    crs: Sequence[float],
    cache: CompressedCache,
    *,
    workers: int = 0,
    on_done: Callable[[int], None] | None = None,
) -> tuple[npt.NDArray[np.float16], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Inputs [len(crs) * len(records), 1, H, W], labels and mean PSNR per breast, CR-major order.

    Work runs in ``workers`` processes (default: every core), one OpenJPEG thread each.
    """
    jobs = [
        (r.files[view], view, r.laterality, float(cr))
        for cr in crs
        for r in records
        for view in ("CC", "MLO")
    ]
    workers = workers or len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(
        workers, initializer=_init_worker, initargs=(cache.root, cache.params)
    ) as pool:
        prepared = []
        for item in pool.map(_work, jobs, chunksize=4):
            prepared.append(item)
            if on_done:
                on_done(1)
    height, width = cache.params.input_shape
    inputs = np.empty((len(jobs) // 2, 1, height, width), dtype=np.float16)
    psnr = np.empty(len(jobs) // 2, dtype=np.float32)
    for i in range(len(jobs) // 2):
        cc, mlo = prepared[2 * i], prepared[2 * i + 1]
        inputs[i] = breast_input(cc.crop, mlo.crop)
        psnr[i] = (cc.psnr_db + mlo.psnr_db) / 2
    labels = np.tile(np.array([r.label for r in records], dtype=np.float32), len(crs))
    return inputs, labels, psnr
