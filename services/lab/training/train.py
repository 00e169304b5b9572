"""Training, evaluation and export of the phantom mammogram classifiers (`crgate train`).

The seed study's recipe: binary cross-entropy, Adam (beta1 0.9, beta2 0.999, eps 1e-8), a model
per training CR mixture, AUROC and AUPRC with 95 % CI per test CR. Deterministic by seed; GPU
when present, CPU otherwise.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 - torch convention
from scipy.stats import t as scipy_t
from torch import nn

from models.architectures import Classifier, build
from models.gradcam import WithGradCam
from services.core import stats
from services.core.dicom.io import read_dataset
from services.core.inference.card import (
    GRADCAM_OUTPUT,
    HIRESCAM_OUTPUT,
    INPUT_NAME,
    PROBABILITY_OUTPUT,
    GradCamGrid,
    ImageGeometry,
    ModelCard,
    TestResult,
    file_sha256,
    write_card,
)
from services.core.inference.preprocess import Preprocessing
from services.lab.training.data import (
    ENCODER_TAG,
    BreastRecord,
    CompressedCache,
    fill_cache,
    folds_by_patient,
    load_breasts,
    load_inputs,
    prepare_pairs,
    split_by_patient,
    training_pairs,
)

STUDY_CRS = (1, 15, 20, 25, 50, 100, 500, 1000, 5000, 10000, 11000)
OPSET = 18

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class TrainConfig:
    data_dir: Path
    out_dir: Path = Path("models")
    name: str = "cnn3-phantom"
    version: str = "v1"
    architecture: str = "cnn3"
    crs: Sequence[float] = (1,)
    lossy_copies: int = 0  # compressed copies per training breast (0: one per lossy CR)
    test_crs: Sequence[float] = STUDY_CRS
    resize_fraction: float = 0.3
    align: int = 32  # each view's crop padded to a multiple (Grad-CAM cells tile the views)
    view_gap: int = 64  # zero columns between the CC and MLO crops
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    augment: bool = True
    schedule: str = "cosine"  # learning rate: "cosine" decay to 0 over the run, or "constant"
    seed: int = 0
    cache_dir: Path = Path("var/cache/compressed")
    workers: int = 0
    threads: int = 0  # torch intra-op threads (0: every core)
    bootstrap: int = 1000
    extra: dict[str, Any] = field(default_factory=dict)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def training_spacing(records: Sequence[BreastRecord]) -> float | None:
    """The training images' pixel spacing in mm (the first image's), when it says."""
    ds = read_dataset(records[0].files["CC"])
    value = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return round(float(value[0]), 6) if value else None


def training_geometry(records: Sequence[BreastRecord]) -> tuple[int, int]:
    """(width, height) of the training images: they must all share one geometry."""
    sizes = set()
    for r in records[:8]:
        ds = read_dataset(r.files["CC"])
        sizes.add((int(ds.Columns), int(ds.Rows)))
    if len(sizes) != 1:
        raise ValueError(f"training images differ in size: {sorted(sizes)}")
    return sizes.pop()


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def fit(
    model: Classifier,
    train: tuple[npt.NDArray[Any], npt.NDArray[Any]],
    val: tuple[npt.NDArray[Any], npt.NDArray[Any]],
    config: TrainConfig,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Adam + BCE; keeps the weights of the epoch with the best validation AUROC."""
    dev = device()
    model.to(dev)
    optimiser = torch.optim.Adam(
        model.parameters(),
        lr=config.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=config.weight_decay,
    )
    x_train, y_train = train
    generator = np.random.default_rng(config.seed)
    best: tuple[float, dict[str, torch.Tensor], int] = (-float("inf"), {}, -1)
    history = []
    steps_per_epoch = (len(x_train) + config.batch_size - 1) // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        (lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
        if config.schedule == "cosine"
        else (lambda step: 1.0),
    )
    for epoch in range(config.epochs):
        model.train()
        order = generator.permutation(len(x_train))
        losses = []
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            x = torch.from_numpy(x_train[idx].astype(np.float32))
            if config.augment:
                x = augment(x, generator)
            x = x.to(dev)
            y = torch.from_numpy(y_train[idx]).to(dev)
            optimiser.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            scheduler.step()
            losses.append(loss.item())
            if progress:
                progress(
                    "training", epoch * steps_per_epoch + step + 1, config.epochs * steps_per_epoch
                )
        val_scores = predict(model, val[0], config.batch_size)
        val_auroc = _selection_score(val[1], val_scores)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_auroc": val_auroc})
        if val_auroc > best[0]:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best = (val_auroc, state, epoch + 1)
    model.load_state_dict(best[1])
    model.eval()
    return {"history": history, "best_epoch": best[2], "best_val_auroc": best[0]}


def _selection_score(labels: npt.NDArray[Any], scores: npt.NDArray[Any]) -> float:
    """Validation AUROC; minus the log loss when the (small) validation set has one class."""
    if labels.min() != labels.max():
        return stats.auroc(labels, scores)
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    return float(np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Training-time augmentation, per input: random vertical flips, shifts of up to 8 pixels
    (the zero padding wraps round) and intensity gains of +-10 %. Breasts keep their canonical
    orientation (chest wall left)."""
    flip = torch.from_numpy(rng.random(len(x)) < 0.5)
    x = x.clone()
    x[flip] = x[flip].flip(2)
    shifts = rng.integers(-8, 9, (len(x), 2))
    for i, (dy, dx) in enumerate(shifts):
        x[i] = torch.roll(x[i], (int(dy), int(dx)), (1, 2))
    gain = rng.uniform(0.9, 1.1, (len(x), 1, 1, 1)).astype(np.float32)
    return x * torch.from_numpy(gain)


@torch.no_grad()
def predict(model: nn.Module, inputs: npt.NDArray[Any], batch_size: int = 64) -> npt.NDArray[Any]:
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for start in range(0, len(inputs), batch_size):
        x = torch.from_numpy(inputs[start : start + batch_size].astype(np.float32)).to(dev)
        out.append(torch.sigmoid(model(x)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def evaluate(
    scores: npt.NDArray[Any],
    labels: npt.NDArray[Any],
    psnr: npt.NDArray[Any],
    cr: float,
    resamples: int,
    seed: int,
    achieved_cr: npt.NDArray[Any] | None = None,
) -> TestResult:
    auroc = stats.bootstrap(stats.auroc, labels, scores, resamples=resamples, seed=seed)
    auprc = stats.bootstrap(stats.auprc, labels, scores, resamples=resamples, seed=seed)
    return TestResult.model_validate(
        {
            "cr": cr,
            "auroc": auroc.as_dict(),
            "auprc": auprc.as_dict(),
            "n_breasts": len(labels),
            "n_malignant": int(labels.sum()),
            "mean_psnr_db": float(np.mean(psnr)),
            "mean_achieved_cr": None if achieved_cr is None else float(np.mean(achieved_cr)),
        }
    )


def export_onnx(model: Classifier, input_shape: tuple[int, int], path: Path) -> None:
    """ONNX with outputs `malignancy` [N], `gradcam` and `hirescam` [N, h, w] (both maps
    computed in the graph: models/gradcam.py)."""
    wrapper = WithGradCam(model.cpu().eval()).eval()
    example = torch.zeros(2, 1, *input_shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        wrapper,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[PROBABILITY_OUTPUT, GRADCAM_OUTPUT, HIRESCAM_OUTPUT],
        dynamic_axes={
            INPUT_NAME: {0: "N"},
            PROBABILITY_OUTPUT: {0: "N"},
            GRADCAM_OUTPUT: {0: "N"},
            HIRESCAM_OUTPUT: {0: "N"},
        },
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def gradcam_shape(model: Classifier, input_shape: tuple[int, int]) -> tuple[int, int]:
    with torch.no_grad():
        a = model.cpu().eval().features(torch.zeros(1, 1, *input_shape))
    return int(a.shape[2]), int(a.shape[3])


def _ticker(progress: Progress | None, stage: str, total: int) -> Callable[[int], None]:
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress:
            progress(stage, done[0], total)

    return advance


@dataclass
class Trained:
    model: Classifier
    params: Preprocessing
    fit_info: dict[str, Any]
    results: list[TestResult]
    seconds: dict[str, float]


def train_and_test(
    config: TrainConfig,
    params: Preprocessing,
    sets: tuple[list[BreastRecord], list[BreastRecord], list[BreastRecord]],
    progress: Progress | None = None,
) -> Trained:
    """Train on the training CR mixture, pick the epoch on validation, test at every test CR."""
    train_set, val_set, test_set = sets
    cache = CompressedCache(config.cache_dir, params)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    pairs = training_pairs(train_set, config.crs, config.lossy_copies, config.seed)
    train = prepare_pairs(
        pairs,
        cache,
        workers=config.workers,
        on_done=_ticker(progress, "compressing training set", 2 * len(pairs)),
    )
    val = prepare_pairs(
        [(r, 1.0) for r in val_set],
        cache,
        workers=config.workers,
        on_done=_ticker(progress, "preparing validation set", 2 * len(val_set)),
    )
    seconds["training and validation copies"] = time.perf_counter() - clock
    clock = time.perf_counter()
    set_seed(config.seed)
    model = build(config.architecture, params.input_shape)
    fit_info = fit(model, (train.x, train.y), (val.x, val.y), config, progress)
    seconds["fit"] = time.perf_counter() - clock
    del train
    clock = time.perf_counter()
    test_crs = list(dict.fromkeys(float(c) for c in config.test_crs))
    all_pairs = [(r, cr) for cr in test_crs for r in test_set]
    fill_cache(
        all_pairs,
        cache,
        workers=config.workers,
        on_done=_ticker(
            progress, f"compressing test set at {len(test_crs)} CRs", 2 * len(all_pairs)
        ),
    )
    seconds["test copies"] = time.perf_counter() - clock
    clock = time.perf_counter()
    results = []
    for cr in test_crs:
        test = load_inputs([(r, cr) for r in test_set], cache)
        scores = predict(model, test.x)
        results.append(
            evaluate(scores, test.y, test.psnr, cr, config.bootstrap, config.seed, test.achieved_cr)
        )
    seconds["testing"] = time.perf_counter() - clock
    return Trained(model, params, fit_info, results, seconds)


def preprocessing_for(config: TrainConfig, width: int, height: int) -> Preprocessing:
    return Preprocessing.for_training_geometry(
        width, height, config.resize_fraction, align=config.align, view_gap=config.view_gap
    )


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))


def _phantom_record(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / "phantom.json"
    return dict(json.loads(path.read_text())) if path.is_file() else None


def train(config: TrainConfig, progress: Progress | None = None) -> ModelCard:
    """Train on the phantoms in ``config.data_dir``, test at every test CR, export model + card."""
    started = time.perf_counter()
    set_seed(config.seed)
    _set_threads(config.threads)
    records = load_breasts(config.data_dir)
    width, height = training_geometry(records)
    params = preprocessing_for(config, width, height)
    sets = split_by_patient(records, config.seed)
    trained = train_and_test(config, params, sets, progress)
    model = trained.model

    stem = f"{config.name}-{config.version}"
    onnx_path = config.out_dir / f"{stem}.onnx"
    clock = time.perf_counter()
    export_onnx(model, params.input_shape, onnx_path)
    trained.seconds["export"] = time.perf_counter() - clock
    stride, offset = model.cam_grid()
    h, w = params.input_shape
    cam_shape = gradcam_shape(model, (h, w))
    card = ModelCard(
        name=config.name,
        version=config.version,
        file=onnx_path.name,
        sha256=file_sha256(onnx_path),
        architecture=config.architecture,
        opset=OPSET,
        input_shape=["N", 1, h, w],
        outputs={
            PROBABILITY_OUTPUT: ["N"],
            GRADCAM_OUTPUT: ["N", *cam_shape],
            HIRESCAM_OUTPUT: ["N", *cam_shape],
        },
        saliency="hirescam",
        gradcam_grid=GradCamGrid(stride=stride, offset=offset),
        preprocessing=params.as_dict(),
        trained_geometry=ImageGeometry(
            cols=width, rows=height, pixel_spacing_mm=training_spacing(records)
        ),
        training={
            "data": "synthetic mammography phantoms from `crgate synth`; not for clinical use",
            "phantom": _phantom_record(config.data_dir),
            "pretrained": False,
            "phantom_geometry": [width, height],
            "breasts": {"train": len(sets[0]), "validation": len(sets[1]), "test": len(sets[2])},
            "split": "7:1:2 by patient",
            "crs": [float(c) for c in config.crs],
            "lossy_copies_per_breast": config.lossy_copies
            or len([c for c in config.crs if float(c) != 1.0]),
            "training_inputs": len(
                training_pairs(sets[0], config.crs, config.lossy_copies, config.seed)
            ),
            "compression": (
                f"OpenJPEG, quick rate search ({ENCODER_TAG}; services/lab/training/data.py)"
            ),
            "optimiser": {
                "name": "Adam",
                "lr": config.learning_rate,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
            },
            "loss": "binary cross-entropy",
            "weight_decay": config.weight_decay,
            "lr_schedule": config.schedule,
            "augmentation": "per input: vertical flip, shift <= 8 px, gain 0.9-1.1"
            if config.augment
            else None,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "device": str(device()),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - started, 1),
            "stage_seconds": {k: round(v, 1) for k, v in trained.seconds.items()},
            **trained.fit_info,
            **config.extra,
        },
        test_results=trained.results,
    )
    write_card(card, config.out_dir / f"{stem}.json")
    return card


def cross_validate(config: TrainConfig, k: int = 5, progress: Progress | None = None) -> Path:
    """The study's k-fold cross-validation by patient: one model per fold, each tested on its
    fold at every test CR; mean AUROC/AUPRC with a 95 % t-interval over folds, in a JSON file."""
    _set_threads(config.threads)
    records = load_breasts(config.data_dir)
    width, height = training_geometry(records)
    params = preprocessing_for(config, width, height)
    folds = folds_by_patient(records, k, config.seed)
    per_fold = []
    for i in range(k):
        rest = [r for j, f in enumerate(folds) if j != i for r in f]
        train_set, val_set, _ = split_by_patient(rest, config.seed + i, (0.875, 0.125, 0.0))
        trained = train_and_test(config, params, (train_set, val_set, folds[i]), progress)
        per_fold.append([r.model_dump(mode="json") for r in trained.results])
    summary_rows = []
    for c, cr in enumerate(dict.fromkeys(float(x) for x in config.test_crs)):
        row: dict[str, Any] = {"cr": cr}
        for metric in ("auroc", "auprc"):
            values = np.array([fold[c][metric]["value"] for fold in per_fold])
            half = float(scipy_t.ppf(0.975, k - 1) * values.std(ddof=1) / np.sqrt(k))
            row[metric] = {
                "mean": float(values.mean()),
                "ci_low": float(values.mean() - half),
                "ci_high": float(values.mean() + half),
                "folds": values.tolist(),
            }
        summary_rows.append(row)
    out = config.out_dir / f"{config.name}-{config.version}-cv{k}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"folds": k, "crs": list(config.crs), "per_cr": summary_rows}, indent=2)
    )
    return out


def summary(card: ModelCard) -> str:
    lines = [f"{card.name} {card.version} ({card.architecture}), sha256 {card.sha256[:12]}..."]
    for r in card.test_results:
        lines.append(
            f"  CR {r.cr:>7g}: AUROC {r.auroc.value:.3f} "
            f"[{r.auroc.ci_low:.3f}, {r.auroc.ci_high:.3f}]"
            f"  AUPRC {r.auprc.value:.3f}  PSNR {r.mean_psnr_db or 0:.1f} dB"
        )
    return "\n".join(lines)
