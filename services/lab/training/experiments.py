"""The seed study's three training experiments (`crgate experiment`, docs/cr-study.md).

1. ``same-cr``: one model per CR, trained and tested on that CR (study Fig. 2, Table 1).
2. ``matrix``: the same models, each tested on every CR (Table 2).
3. ``augmentation``: models trained on the CR ranges 1-15, 1-20, ..., 1-11K (the original plus
   compressed copies drawn from the range), each tested on every CR (Fig. 4).

Every model is defined by its architecture and training CRs (plus the shared settings); it is
trained once and kept in ``<out>/models`` (weights and per-CR test results), so the experiments
share models (``matrix`` reuses ``same-cr``'s and adds test CRs; ``augmentation`` reuses M-CR1)
and a rerun after an interruption trains only what is missing. All models see the same
train/validation/test split by patient and the same number of optimisation steps, so they
differ only in what they were trained on. Compressed copies come from training's
:class:`~services.lab.training.data.CompressedCache`, shared with `crgate train`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from models.architectures import build
from services.core.dicom.io import atomic_output
from services.core.errors import InvalidParameter
from services.core.inference.card import TestResult
from services.lab.safety.plots import cr_label
from services.lab.training.data import (
    BreastRecord,
    CompressedCache,
    fill_cache,
    load_breasts,
    load_inputs,
    prepare_pairs,
    split_by_patient,
    training_pairs,
)
from services.lab.training.train import (
    STUDY_CRS,
    Progress,
    TrainConfig,
    _set_threads,
    evaluate,
    fit,
    predict,
    preprocessing_for,
    set_seed,
    training_geometry,
)

EXPERIMENTS = ("same-cr", "matrix", "augmentation")
ARCHITECTURES = ("cnn3", "resnet18")


@dataclass(frozen=True)
class ModelSpec:
    """One model of an experiment: its architecture and the CRs it is trained on."""

    arch: str
    train_crs: tuple[float, ...]

    @property
    def label(self) -> str:
        """The study's names: M-CR1K (one CR), M-CR1to1K (the range from 1)."""
        if len(self.train_crs) == 1:
            return f"M-CR{cr_label(self.train_crs[0])}"
        return f"M-CR{cr_label(self.train_crs[0])}to{cr_label(self.train_crs[-1])}"


@dataclass(frozen=True)
class Planned:
    spec: ModelSpec
    test_crs: tuple[float, ...]


def plan(experiment: str, archs: Sequence[str], crs: Sequence[float]) -> list[Planned]:
    """The models an experiment trains and the CRs each is tested on."""
    crs = tuple(sorted(dict.fromkeys(float(c) for c in crs)))
    if experiment not in EXPERIMENTS:
        raise InvalidParameter(f"unknown experiment {experiment!r}: use {', '.join(EXPERIMENTS)}")
    for arch in archs:
        if arch not in ARCHITECTURES:
            raise InvalidParameter(f"--arch {arch}: unknown architecture, use cnn3 or resnet18")
    if experiment == "augmentation" and crs[0] != 1.0:
        raise InvalidParameter("the augmentation experiment needs CR 1 (its ranges start at 1)")
    planned = []
    for arch in archs:
        for cr in crs:
            if experiment == "same-cr":
                planned.append(Planned(ModelSpec(arch, (cr,)), (cr,)))
            elif experiment == "matrix":
                planned.append(Planned(ModelSpec(arch, (cr,)), crs))
            else:
                mixture = tuple(c for c in crs if c <= cr)
                planned.append(Planned(ModelSpec(arch, mixture), crs))
    return planned


@dataclass
class ExperimentConfig:
    data_dir: Path
    out_dir: Path = Path("var/experiments")
    archs: tuple[str, ...] = ("cnn3",)
    crs: tuple[float, ...] = STUDY_CRS
    steps: int = 600  # optimisation steps per model, whatever its training set's size
    lossy_copies: int = 1  # compressed copies per breast and epoch-set in a mixture (0: all)
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    resize_fraction: float = 0.3
    align: int = 32
    view_gap: int = 64
    seed: int = 0
    cache_dir: Path = Path("var/cache/compressed")
    workers: int = 0
    threads: int = 0
    bootstrap: int = 1000
    extra: dict[str, Any] = field(default_factory=dict)

    def train_config(self, spec: ModelSpec, epochs: int) -> TrainConfig:
        return TrainConfig(
            data_dir=self.data_dir,
            architecture=spec.arch,
            crs=spec.train_crs,
            lossy_copies=self.lossy_copies,
            resize_fraction=self.resize_fraction,
            align=self.align,
            view_gap=self.view_gap,
            epochs=epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            seed=self.seed,
            cache_dir=self.cache_dir,
            workers=self.workers,
            threads=self.threads,
            bootstrap=self.bootstrap,
        )


@dataclass
class ModelOutcome:
    spec: ModelSpec
    results: dict[float, TestResult]
    info: dict[str, Any]
    trained_now: bool
    tested_now: list[float]


class ModelStore:
    """Trained models of the experiments: ``<key>.pt`` (weights) and ``<key>.json`` (what it was
    trained on, how, and its test results per CR), written atomically."""

    def __init__(self, root: Path, fingerprint: dict[str, Any]) -> None:
        self.root = root
        self.fingerprint = fingerprint

    def key(self, spec: ModelSpec) -> str:
        blob = json.dumps(
            {"arch": spec.arch, "train_crs": spec.train_crs, **self.fingerprint}, sort_keys=True
        ).encode()
        return f"{spec.arch}-{spec.label}-{hashlib.sha256(blob).hexdigest()[:10]}"

    def read(self, spec: ModelSpec) -> dict[str, Any] | None:
        path = self.root / f"{self.key(spec)}.json"
        weights = self.root / f"{self.key(spec)}.pt"
        if not (path.is_file() and weights.is_file()):
            return None
        return dict(json.loads(path.read_text()))

    def weights(self, spec: ModelSpec) -> Path:
        return self.root / f"{self.key(spec)}.pt"

    def write(self, spec: ModelSpec, record: dict[str, Any], model: torch.nn.Module) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.weights(spec).is_file():
            with atomic_output(self.weights(spec)) as fh:
                torch.save(model.state_dict(), fh)
        with atomic_output(self.root / f"{self.key(spec)}.json") as fh:
            fh.write(json.dumps(record, indent=1).encode())


@dataclass
class ExperimentRun:
    experiment: str
    config: ExperimentConfig
    outcomes: list[ModelOutcome]
    split: dict[str, int]
    seconds: float
    panel: Image.Image | None = None  # same-cr: the study's Fig. 3 (experiment_panel.py)


def run_experiment(
    experiment: str, config: ExperimentConfig, progress: Progress | None = None
) -> ExperimentRun:
    """Train what is missing, test what is untested, return every planned model's results."""
    started = time.perf_counter()
    planned = plan(experiment, config.archs, config.crs)
    _set_threads(config.threads)
    records = load_breasts(config.data_dir)
    width, height = training_geometry(records)
    params = preprocessing_for(config.train_config(planned[0].spec, 1), width, height)
    sets = split_by_patient(records, config.seed)
    cache = CompressedCache(config.cache_dir, params)
    store = ModelStore(config.out_dir / "models", _fingerprint(config, records, params.as_dict()))
    all_crs = sorted({c for p in planned for c in (*p.spec.train_crs, *p.test_crs)})
    _fill(sets, all_crs, cache, config, progress)
    outcomes = []
    for i, item in enumerate(planned):
        if progress:
            progress(f"{experiment}: models ({item.spec.arch})", i, len(planned))
        outcomes.append(_model(item, sets, cache, store, config, progress))
    if progress:
        progress(f"{experiment}: models ({planned[-1].spec.arch})", len(planned), len(planned))
    split = {"train": len(sets[0]), "validation": len(sets[1]), "test": len(sets[2])}
    panel = None
    if experiment == "same-cr":
        if progress:
            progress(f"{experiment}: saliency panel", 0, 1)
        panel = _panel(outcomes, sets[2], cache, store, config)
    return ExperimentRun(experiment, config, outcomes, split, time.perf_counter() - started, panel)


def _panel(
    outcomes: Sequence[ModelOutcome],
    test_set: Sequence[BreastRecord],
    cache: CompressedCache,
    store: ModelStore,
    config: ExperimentConfig,
) -> Image.Image | None:
    """Fig. 3 from the first architecture's single-CR models (see experiment_panel.py)."""
    from services.lab.training.experiment_panel import PANEL_CRS, same_cr_panel

    arch = config.archs[0]
    models = {}
    for o in outcomes:
        if o.spec.arch == arch and len(o.spec.train_crs) == 1 and o.spec.train_crs[0] in PANEL_CRS:
            model = build(arch, cache.params.input_shape)
            model.load_state_dict(torch.load(store.weights(o.spec), weights_only=True))
            models[o.spec.train_crs[0]] = model
    return same_cr_panel(models, test_set, cache, config.data_dir)


def _fingerprint(
    config: ExperimentConfig, records: Sequence[BreastRecord], preprocessing: dict[str, Any]
) -> dict[str, Any]:
    """Everything besides the architecture and training CRs that makes a model what it is."""
    truth = (config.data_dir / "truth.csv").read_bytes()
    return {
        "data": hashlib.sha256(truth).hexdigest()[:16],
        "breasts": len(records),
        "preprocessing": preprocessing,
        "steps": config.steps,
        "lossy_copies": config.lossy_copies,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "seed": config.seed,
    }


def _fill(
    sets: tuple[list[BreastRecord], ...],
    crs: Sequence[float],
    cache: CompressedCache,
    config: ExperimentConfig,
    progress: Progress | None,
) -> None:
    """Every view of every set at every CR of the run, in parallel, before any fitting."""
    pairs = [(r, cr) for part in sets for r in part for cr in crs]
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress:
            progress(f"compressed copies at {len(crs)} CRs", done[0], 2 * len(pairs))

    fill_cache(pairs, cache, workers=config.workers, on_done=advance)


def _model(
    item: Planned,
    sets: tuple[list[BreastRecord], list[BreastRecord], list[BreastRecord]],
    cache: CompressedCache,
    store: ModelStore,
    config: ExperimentConfig,
    progress: Progress | None,
) -> ModelOutcome:
    spec = item.spec
    record = store.read(spec)
    trained_now = record is None
    train_set, val_set, test_set = sets
    if record is None:
        pairs = training_pairs(train_set, spec.train_crs, config.lossy_copies, config.seed)
        epochs = max(1, math.ceil(config.steps * config.batch_size / len(pairs)))
        train_config = config.train_config(spec, epochs)
        train = prepare_pairs(pairs, cache, workers=config.workers)
        # validation drawn like training: the same CR, or the same kind of mixture
        val_pairs = training_pairs(val_set, spec.train_crs, config.lossy_copies, config.seed + 1)
        val = load_inputs(val_pairs, cache)
        set_seed(config.seed)
        model = build(spec.arch, cache.params.input_shape)
        clock = time.perf_counter()
        stage = f"{spec.arch} {spec.label}: fitting"
        fit_info = fit(
            model,
            (train.x, train.y),
            (val.x, val.y),
            train_config,
            (lambda _s, d, t: progress(stage, d, t)) if progress else None,
        )
        record = {
            "arch": spec.arch,
            "label": spec.label,
            "train_crs": list(spec.train_crs),
            "training_inputs": len(pairs),
            "epochs": epochs,
            "fit_seconds": round(time.perf_counter() - clock, 1),
            "torch_threads": torch.get_num_threads(),
            "best_epoch": fit_info["best_epoch"],
            "best_val_auroc": fit_info["best_val_auroc"],
            "history": fit_info["history"],
            "results": {},
        }
        del train
    else:
        model = build(spec.arch, cache.params.input_shape)
        model.load_state_dict(torch.load(store.weights(spec), weights_only=True))
        model.eval()
    results = {float(k): TestResult.model_validate(v) for k, v in record["results"].items()}
    missing = [cr for cr in item.test_crs if cr not in results]
    for cr in missing:
        test = load_inputs([(r, cr) for r in test_set], cache)
        scores = predict(model, test.x)
        results[cr] = evaluate(
            scores, test.y, test.psnr, cr, config.bootstrap, config.seed, test.achieved_cr
        )
    if trained_now or missing:
        record["results"] = {
            f"{cr:g}": r.model_dump(mode="json") for cr, r in sorted(results.items())
        }
        store.write(spec, record, model)
    wanted = {cr: results[cr] for cr in item.test_crs}
    return ModelOutcome(spec, wanted, record, trained_now, missing)
