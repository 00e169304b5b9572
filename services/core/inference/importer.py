"""``crgate model import``: a site's own ONNX classifier, inspected, carded, tried and installed.

1. :func:`inspect_graph` reads the graph's input and outputs (names, element types, shapes; a
   dynamic or a fixed batch of one) and its opset.
2. :func:`plan_card` writes the card: the input size (from the graph, or ``--input-size`` when
   the graph leaves it open), the preprocessing that makes that size (:func:`preprocessing_for`),
   which output is the probability (the only ``[N]``/``[N, 1]`` float output, or ``--output``),
   the saliency (the graph's ``hirescam``/``gradcam`` output when present, occlusion otherwise),
   the sha256, the operating threshold, and the training geometry the preprocessing implies.
3. :func:`import_model` loads the model with that card exactly as the service would
   (:meth:`Classifier.load`), classifies the breasts of one test study (the caller makes it: a
   phantom, from the lab), refuses a non-finite or out-of-range probability, and installs
   ``<name>-<version>.onnx`` and ``.json`` in the models folder, the card last.

Every refusal is one :class:`~services.core.errors.InvalidInput` line naming the model and the fix.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from services.core.errors import Conflict, InvalidInput, InvalidParameter, NotFound
from services.core.inference.card import (
    GRAPH_SALIENCY,
    ImageGeometry,
    ModelCard,
    file_sha256,
    load_card,
    write_card,
)
from services.core.inference.preprocess import VIEW_MODES, Preprocessing
from services.core.inference.registry import check_key, installed

TestStudy = Callable[[int, int], list[tuple[str, Dataset]]]  # (cols, rows) -> one study's views
FLOAT = "tensor(float)"


@dataclass(frozen=True)
class ImportOptions:
    name: str
    version: str
    input_size: tuple[int, int] | None = None  # (H, W) when the graph leaves it open
    resize_fraction: float = 0.3  # the view grid as a fraction of the site's images
    views: str = "cc+mlo"
    threshold: float = 0.5
    output: str | None = None  # the probability output, when the graph has several candidates

    def __post_init__(self) -> None:
        check_key(self.name, "--name")
        check_key(self.version, "--version")
        if self.views not in VIEW_MODES:
            raise InvalidParameter(f"--views {self.views!r}: use {' or '.join(VIEW_MODES)}")
        if not 0.05 <= self.resize_fraction <= 1:
            raise InvalidParameter(
                f"--resize-fraction {self.resize_fraction:g}: use a fraction from 0.05 to 1"
            )
        if not 0 <= self.threshold <= 1:
            raise InvalidParameter(f"--threshold {self.threshold:g}: use a probability 0 to 1")
        if self.input_size is not None and min(self.input_size) < 8:
            raise InvalidParameter(f"--input-size {self.input_size}: at least 8x8 pixels")

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"


@dataclass(frozen=True)
class GraphSummary:
    input_name: str
    input_type: str
    input_shape: list[int | str]
    outputs: dict[str, tuple[str, list[int | str]]]  # name -> (element type, shape)
    opset: int


@dataclass(frozen=True)
class ImportResult:
    key: str
    card_path: Path
    model_path: Path
    card: ModelCard
    probabilities: list[float] = field(default_factory=list)


def parse_size(text: str) -> tuple[int, int]:
    """``"256x320"`` (height x width) -> (256, 320)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InvalidParameter(f"--input-size {text!r}: use HEIGHTxWIDTH in pixels, e.g. 256x320")
    return int(parts[0]), int(parts[1])


def _dim(value: object) -> int | str:
    if isinstance(value, int) and value > 0:
        return value
    return str(value) if isinstance(value, str) and value else "?"


def inspect_graph(model_bytes: bytes, where: str) -> GraphSummary:
    """The graph's input, outputs and opset (onnxruntime opens it; onnx reads the opset)."""
    import onnx

    from services.core.inference.runtime import open_session

    try:
        proto = onnx.load_model_from_string(model_bytes)
        session = open_session(model_bytes)
    except Exception as exc:  # onnx and onnxruntime raise their own types
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise InvalidInput(f"{where} is not an ONNX model onnxruntime can open ({text})") from None
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise InvalidInput(
            f"{where} has {len(inputs)} inputs ({names}); crgate feeds a classifier one image input"
        )
    first = inputs[0]
    return GraphSummary(
        input_name=first.name,
        input_type=first.type,
        input_shape=[_dim(d) for d in first.shape],
        outputs={o.name: (o.type, [_dim(d) for d in o.shape]) for o in session.get_outputs()},
        opset=int(opset),
    )


def preprocessing_for(height: int, width: int, views: str, fraction: float = 0.3) -> Preprocessing:
    """The seed study's preprocessing that makes an input of ``height`` x ``width``: each view
    scaled to a grid, its chest-wall half kept, the fifth at the far end cut; ``cc+mlo`` puts
    the two crops side by side (one zero column between them when ``width`` is odd)."""
    if views == "single":
        crop_cols, gap = width, 0
    else:
        crop_cols, gap = width // 2, width % 2
    view_rows = next(
        r
        for r in range(max(1, round(height / 0.8) - 2), round(height / 0.8) + 3)
        if r - round(r * 0.2) == height
    )
    return Preprocessing(
        view_rows=view_rows,
        view_cols=2 * crop_cols,
        resize_fraction=fraction,
        view_gap=gap,
        views=views,
    )


def plan_card(
    graph: GraphSummary, options: ImportOptions, file: str, sha256: str, where: str
) -> ModelCard:
    """The card of an inspected graph (see the module docstring); refusals are one line."""
    from services.core.inference.runtime import is_probability_shape

    shape = graph.input_shape
    if graph.input_type != FLOAT:
        raise InvalidInput(
            f"{where}: no float input: input {graph.input_name!r} is {graph.input_type}; crgate "
            "feeds float32 images scaled to [0, 1]: export the model with a float32 input"
        )
    if len(shape) != 4 or shape[1] != 1:
        raise InvalidInput(
            f"{where}: input {graph.input_name!r} has rank {len(shape)} shape "
            f"{_text(shape)}; crgate feeds [N, 1, H, W] (a batch of one-channel images)"
        )
    batch = shape[0]
    if isinstance(batch, int) and batch != 1:
        raise InvalidInput(
            f"{where}: input {graph.input_name!r} has a fixed batch of {batch}: export with a "
            "dynamic batch dimension or a batch of 1"
        )
    fixed = [d if isinstance(d, int) else None for d in shape[2:]]
    if options.input_size is not None:
        if any(f is not None and f != g for f, g in zip(fixed, options.input_size, strict=True)):
            raise InvalidInput(
                f"{where}: --input-size {options.input_size[0]}x{options.input_size[1]} differs "
                f"from the graph's input {_text(shape)}: leave --input-size out"
            )
        height, width = options.input_size
    elif fixed[0] is None or fixed[1] is None:
        raise InvalidInput(
            f"{where}: the graph's input {_text(shape)} leaves its height or width open: give "
            "--input-size HxW (what the model was trained on)"
        )
    else:
        height, width = fixed[0], fixed[1]
    max_batch = 1 if isinstance(batch, int) else None
    candidates = [
        name
        for name, (kind, out_shape) in graph.outputs.items()
        if kind == FLOAT and is_probability_shape(out_shape, max_batch)
    ]
    probability = _probability_output(graph, options.output, candidates, where)
    cams = [
        method
        for method, name in GRAPH_SALIENCY.items()
        if name in graph.outputs and len(graph.outputs[name][1]) == 3
    ]
    saliency = "occlusion"
    if options.views != "single" and cams:
        saliency = "hirescam" if "hirescam" in cams else cams[0]
    params = preprocessing_for(height, width, options.views, options.resize_fraction)
    return ModelCard(
        name=options.name,
        version=options.version,
        file=file,
        sha256=sha256,
        architecture="imported",
        opset=graph.opset,
        input_name=graph.input_name,
        input_shape=[batch if isinstance(batch, int) else "N", 1, height, width],
        outputs={name: out_shape for name, (_kind, out_shape) in graph.outputs.items()},
        probability_output=probability,
        saliency=saliency,
        preprocessing=params.as_dict(),
        operating_threshold=options.threshold,
        training={
            "data": "not stated: a site's own model, imported with `crgate model import`; "
            "validate it with `crgate study` on the site's labelled studies (docs/classifier.md)"
        },
        intended_use="a site's own model; crgate knows nothing of its training or validation",
        trained_geometry=ImageGeometry(
            cols=round(params.view_cols / options.resize_fraction),
            rows=round(params.view_rows / options.resize_fraction),
        ),
    )


def _probability_output(
    graph: GraphSummary, chosen: str | None, candidates: list[str], where: str
) -> str:
    if chosen is not None:
        if chosen not in graph.outputs:
            raise InvalidInput(
                f"{where}: --output {chosen!r} is not an output of the graph "
                f"({', '.join(graph.outputs)})"
            )
        if chosen not in candidates:
            kind, shape = graph.outputs[chosen]
            raise InvalidInput(
                f"{where}: output {chosen!r} is {kind} {_text(shape)}; the probability must be "
                "a float [N] or [N, 1]"
            )
        return chosen
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        shapes = ", ".join(f"{n} {k} {_text(s)}" for n, (k, s) in graph.outputs.items())
        raise InvalidInput(
            f"{where}: no output is a float [N] or [N, 1] probability ({shapes}): export one "
            "(add a Sigmoid or Softmax and take the malignant column)"
        )
    raise InvalidInput(
        f"{where}: {len(candidates)} outputs could be the probability "
        f"({', '.join(candidates)}): name it with --output"
    )


def _text(shape: list[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def import_model(
    path: Path, options: ImportOptions, models_dir: Path, test_study: TestStudy
) -> ImportResult:
    """Inspect, card, try on ``test_study(cols, rows)`` and install (module docstring)."""
    from services.core.inference.breasts import classify_breasts, group_breasts
    from services.core.inference.runtime import Classifier

    where = f"ONNX model {path}"
    try:
        model_bytes = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{where} not found") from None
    except OSError as exc:
        raise NotFound(f"{where} cannot be read ({exc.strerror or exc})") from None
    key = options.key
    if key in installed(models_dir):
        raise Conflict(
            f"model {key} is already installed in {models_dir}: remove it first "
            f"(crgate model remove {key}) or give another --version"
        )
    graph = inspect_graph(model_bytes, where)
    file = f"{key}.onnx"
    with tempfile.TemporaryDirectory(prefix="crgate-import-") as tmp:
        staged = Path(tmp) / file
        staged.write_bytes(model_bytes)
        card = plan_card(graph, options, file, file_sha256(staged), where)
        card_path = Path(tmp) / f"{key}.json"
        write_card(card, card_path)
        classifier = Classifier.load(card_path)  # the service's own checks of card and graph
        geometry = card.trained_geometry
        assert geometry is not None
        started = time.perf_counter()
        results = classify_breasts(
            classifier,
            group_breasts(test_study(geometry.cols, geometry.rows)),
            saliency=card.saliency != "occlusion",
        )
        probabilities = [r.probability for r in results]
        bad = [p for p in probabilities if not math.isfinite(p) or not 0 <= p <= 1]
        if bad:
            what = "non-finite" if not all(math.isfinite(p) for p in bad) else "out-of-range"
            raise InvalidInput(
                f"{where}: {what} output {bad[0]!r} from {card.probability_output!r} on a "
                "phantom breast: the output must be a probability in [0, 1] (a logit needs a "
                "Sigmoid; NaN means a broken graph or weights)"
            )
        extra: dict[str, Any] = {
            "source": path.name,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "graph": {
                "input": [graph.input_name, graph.input_type, graph.input_shape],
                "outputs": {n: [k, s] for n, (k, s) in graph.outputs.items()},
            },
            "test": {
                "what": "one phantom study (crgate synth, default preset) at the card's geometry",
                "probabilities": probabilities,
                "seconds": round(time.perf_counter() - started, 3),
            },
        }
        data = card.model_dump(mode="json")
        data["imported"] = extra
        card_path.write_text(json.dumps(data, indent=2) + "\n")
        card = load_card(card_path)
        models_dir.mkdir(parents=True, exist_ok=True)
        target_model = models_dir / file
        target_card = models_dir / f"{key}.json"
        for source, target in ((staged, target_model), (card_path, target_card)):
            part = target.with_name(f".{target.name}.part")
            shutil.copyfile(source, part)
            part.replace(target)
    return ImportResult(key, target_card, target_model, card, probabilities)
