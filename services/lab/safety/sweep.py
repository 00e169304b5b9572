"""Classify every breast of a labelled set at every CR; one partial result file per CR.

For each CR (ascending, CR 1 first) every breast's views are compressed (or taken from the
copy cache, :mod:`.copies`), decoded, preprocessed as the model's card says and classified.
Worker processes make the inputs (one breast at one CR per job), the main process runs the
model in batches. When a CR is done its probabilities and the quality of every view's copy go
to ``<out>/partial/cr-<CR>.json`` atomically, stamped with a fingerprint of the model, its
preprocessing, the encoder and the labelled set. A rerun skips every CR whose partial file
carries the same fingerprint; a CR interrupted half way finds the copies made so far in the
cache, so only its inference is repeated.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from services.core.dicom.io import atomic_output
from services.core.errors import InvalidInput, InvalidParameter, NotFound
from services.core.inference.preprocess import Preprocessing, breast_input, prepare_view
from services.core.ratio import STUDY_CRS, parse_cr_list
from services.lab.pools import process_pool
from services.lab.safety.copies import ENCODERS, CopyCache, Quality, ViewCopy
from services.lab.safety.labels import LabelledBreast, LabelledSet

if TYPE_CHECKING:
    from services.core.inference.card import ModelCard
    from services.core.inference.runtime import Classifier

PARTIAL_DIR = "partial"
MIN_BOOTSTRAP = 100
Progress = Callable[[str, int, int], None]  # (what, done, total)
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class SafetyStudyConfig:
    crs: tuple[float, ...] = STUDY_CRS
    bootstrap: int = 1000
    margin: float = 0.02
    confidence: float = 0.95
    threshold: float | None = None  # None: the card's operating threshold
    encoder: str = "quick"
    workers: int = 0  # 0: every core
    seed: int = 0
    batch_size: int = 32
    notes: tuple[str, ...] = ()
    min_per_class: int | None = None  # None: the power calculation's (safety/evidence.py)

    def __post_init__(self) -> None:
        if isinstance(self.bootstrap, bool) or self.bootstrap < MIN_BOOTSTRAP:
            raise InvalidParameter(
                f"bootstrap resamples {self.bootstrap}: use at least {MIN_BOOTSTRAP} (default 1000)"
            )
        if not 0 < self.margin < 0.5:
            raise InvalidParameter(
                f"non-inferiority margin {self.margin}: use an AUROC difference between 0 and "
                "0.5 (default 0.02)"
            )
        if not 0.5 < self.confidence < 1:
            raise InvalidParameter(f"confidence {self.confidence}: use a level between 0.5 and 1")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise InvalidParameter(f"threshold {self.threshold}: use a probability from 0 to 1")
        if self.encoder not in ENCODERS:
            raise InvalidParameter(f"encoder {self.encoder!r}: use one of {', '.join(ENCODERS)}")
        if self.min_per_class is not None and (
            isinstance(self.min_per_class, bool) or self.min_per_class < 1
        ):
            raise InvalidParameter(
                f"minimum breasts per class {self.min_per_class}: use 1 or more (default: the "
                "power calculation's, docs/cr-study.md)"
            )
        if self.workers < 0:
            raise InvalidParameter(f"workers {self.workers}: use 0 (every core) or more")
        if not self.crs or 1.0 not in self.crs or list(self.crs) != sorted(set(self.crs)):
            raise InvalidParameter("the CR list must be ascending, unique and include 1")


def parse_crs(text: str) -> tuple[tuple[float, ...], list[str]]:
    """``"1,15,25"`` -> the CRs ascending and unique, with CR 1 added when missing (noted)."""
    values: list[float] = list(parse_cr_list(text))
    notes = []
    if 1.0 not in values:
        values.append(1.0)
        notes.append("CR 1 (the reference every other CR is compared with) was added")
    return tuple(sorted(set(values))), notes


def resolve_model(model: str, models_dir: Path) -> Path:
    """The card of ``model``: a card path (.json), an ONNX path with its card beside it, or a
    name in ``models_dir``. A model without a card is refused: the card says how to feed it."""
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        card = path.with_suffix(".json")
        if not path.is_file():
            raise NotFound(f"model {path} not found")
        if not card.is_file():
            raise InvalidInput(
                f"model {path} has no card ({card.name} beside it): the study needs the card's "
                "preprocessing and operating threshold; write one (docs/classifier.md)"
            )
        return card
    if path.suffix.lower() == ".json" or path.parent != Path():
        if not path.is_file():
            raise NotFound(f"model card {path} not found")
        return path
    card = models_dir / f"{model}.json"
    if card.is_file():
        return card
    onnx = models_dir / f"{model}.onnx"
    if onnx.is_file():
        raise InvalidInput(
            f"model {model} ({onnx}) has no card ({card.name}): the study needs the card's "
            "preprocessing and operating threshold; write one (docs/classifier.md)"
        )
    known = sorted(p.stem for p in models_dir.glob("*.json"))
    raise NotFound(
        f"no model {model!r} in {models_dir}"
        + (f": choose one of {', '.join(known)}" if known else "")
    )


def threshold_of(card: ModelCard, configured: float | None) -> tuple[float, str]:
    """The decision threshold and where it came from."""
    if configured is not None:
        return configured, "given"
    if "operating_threshold" in card.model_fields_set:
        return float(card.operating_threshold), "card"
    return 0.5, "default (the card names none)"


def fingerprint(card: ModelCard, labelled: LabelledSet, encoder_tag: str) -> dict[str, Any]:
    return {
        "model_sha256": card.sha256.strip().lower(),
        "preprocessing": card.preprocessing,
        "encoder": encoder_tag,
        "labelled_set": labelled.fingerprint(),
    }


# ---------------------------------------------------------------------- partial results


@dataclass
class CrResult:
    """One CR: probability per breast (by key) and the quality of every view's copy."""

    cr: float
    fingerprint: dict[str, Any]
    probabilities: dict[str, float]
    views: list[dict[str, Any]]  # file, view, quality fields
    seconds: float
    cache_hits: int
    cache_misses: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def partial_path(out_dir: Path, cr: float) -> Path:
    return out_dir / PARTIAL_DIR / f"cr-{cr:g}.json"


def load_partial(out_dir: Path, cr: float, stamp: dict[str, Any]) -> CrResult | None:
    """The CR's partial result when it exists and was made from the same inputs."""
    path = partial_path(out_dir, cr)
    try:
        data = json.loads(path.read_text())
        result = CrResult(**data)
    except (OSError, ValueError, TypeError):
        return None
    return result if result.fingerprint == stamp and result.cr == cr else None


def _write_partial(out_dir: Path, result: CrResult) -> None:
    path = partial_path(out_dir, result.cr)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as fh:
        fh.write(json.dumps(result.as_dict()).encode())


# ---------------------------------------------------------------------- workers

Job = tuple[int, LabelledBreast, float]
Made = tuple[int, F32, list[tuple[str, str, Quality]], int, int]

_CACHE: CopyCache | None = None
_PARAMS: Preprocessing | None = None


def _init_worker(root: Path, encoder: str, params: dict[str, Any]) -> None:
    global _CACHE, _PARAMS
    _CACHE = CopyCache(root, encoder)
    _PARAMS = Preprocessing.from_dict(params)


def _make_input(job: Job) -> Made:
    """One breast's model input at one CR, and the quality of its views' copies."""
    assert _CACHE is not None and _PARAMS is not None
    index, breast, cr = job
    copies: dict[Path, ViewCopy] = {}
    crops = []
    for view, file in breast.input_files():
        copy = copies.get(file)
        if copy is None:
            copy = copies[file] = _CACHE.view(file, cr)
        crops.append(
            prepare_view(
                copy.pixels,
                view,
                breast.laterality,
                _PARAMS,
                bits_stored=copy.bits_stored,
                photometric=copy.photometric,
            )
        )
    x = breast_input(crops[0], crops[1], _PARAMS).astype(np.float32)
    by_view = {file: view for view, file in breast.views.items()}
    qualities = [(str(f), by_view.get(f, ""), c.quality) for f, c in copies.items()]
    hits = sum(1 for c in copies.values() if c.cached) if cr != 1 else 0
    misses = sum(1 for c in copies.values() if not c.cached)
    return index, x, qualities, hits, misses


@dataclass
class SweepOutcome:
    results: dict[float, CrResult] = field(default_factory=dict)
    reused: list[float] = field(default_factory=list)
    computed: list[float] = field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0
    seconds: float = 0.0


def run_sweep(
    labelled: LabelledSet,
    classifier: Classifier,
    config: SafetyStudyConfig,
    out_dir: Path,
    cache_dir: Path,
    progress: Progress | None = None,
) -> SweepOutcome:
    """Probabilities of every breast at every CR of ``config`` (reusing finished CRs)."""
    started = time.perf_counter()
    cache = CopyCache(cache_dir, config.encoder)
    stamp = fingerprint(classifier.card, labelled, cache.tag)
    outcome = SweepOutcome()
    todo = []
    for cr in config.crs:
        done = load_partial(out_dir, cr, stamp)
        if done is None:
            todo.append(cr)
        else:
            outcome.results[cr] = done
            outcome.reused.append(cr)
    breasts = labelled.breasts
    total = len(todo) * len(breasts)
    if progress:
        progress("classifying", 0, total)
    if todo:
        with InputMaker(cache, classifier.preprocessing, config.workers) as make:
            for step, cr in enumerate(todo):

                def advance(n: int, step: int = step, cr: float = cr) -> None:
                    if progress:
                        what = f"CR {cr:g} ({step + 1}/{len(todo)})"
                        progress(what, step * len(breasts) + n, total)

                result = _one_cr(classifier, breasts, cr, stamp, make, config.batch_size, advance)
                _write_partial(out_dir, result)
                outcome.results[cr] = result
                outcome.computed.append(cr)
                outcome.cache_hits += result.cache_hits
                outcome.cache_misses += result.cache_misses
    outcome.seconds = time.perf_counter() - started
    return outcome


MakeInputs = Callable[[Sequence[Job]], Iterator[Made]]


class InputMaker:
    """Makes inputs in a process pool (``workers`` != 1) or in this process."""

    def __init__(self, cache: CopyCache, params: Preprocessing, workers: int) -> None:
        self.args = (cache.root, cache.encoder, params.as_dict())
        self.workers = workers or len(os.sched_getaffinity(0))
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> MakeInputs:
        if self.workers == 1:
            _init_worker(*self.args)
            return lambda jobs: map(_make_input, jobs)
        # forkserver: workers start from a clean process, not a fork of one running ONNX threads
        self.pool = process_pool(
            self.workers, _init_worker, self.args, multiprocessing.get_context("forkserver")
        )
        pool = self.pool
        return lambda jobs: pool.map(_make_input, jobs, chunksize=1)

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _one_cr(
    classifier: Classifier,
    breasts: list[LabelledBreast],
    cr: float,
    stamp: dict[str, Any],
    make: MakeInputs,
    batch_size: int,
    advance: Callable[[int], None],
) -> CrResult:
    started = time.perf_counter()
    probs = np.empty(len(breasts), dtype=np.float64)
    views: list[dict[str, Any]] = []
    hits = misses = 0
    pending: list[tuple[int, F32]] = []

    def flush() -> None:
        batch = np.stack([x for _, x in pending])
        p, _ = classifier.predict(batch, batch_size=batch_size, saliency=False)
        for (i, _), value in zip(pending, p, strict=True):
            probs[i] = float(value)
        pending.clear()

    jobs = [(i, b, cr) for i, b in enumerate(breasts)]
    for done, (index, x, qualities, h, m) in enumerate(make(jobs), start=1):
        pending.append((index, x))
        for file, view, quality in qualities:
            views.append({"file": file, "view": view, **quality.as_dict()})
        hits += h
        misses += m
        if len(pending) >= batch_size:
            flush()
        advance(done)
    if pending:
        flush()
    return CrResult(
        cr=cr,
        fingerprint=stamp,
        probabilities={b.key: float(p) for b, p in zip(breasts, probs, strict=True)},
        views=views,
        seconds=time.perf_counter() - started,
        cache_hits=hits,
        cache_misses=misses,
    )
