"""ONNX Runtime sessions for the mammogram classifiers; the service never imports torch.

:meth:`Classifier.load` reads a model card, checks that the ONNX file is the one the card names
(sha256) and that the graph's input and outputs are the ones the card describes, and opens one
``onnxruntime.InferenceSession`` on the best available provider (CUDA, else CPU).
:func:`get_classifier` keeps one classifier per (card, model hash) per process.

:meth:`Classifier.predict` takes preprocessed breast inputs ``[N, 1, H, W]`` and returns the
malignancy probabilities ``[N]`` (the card's ``probability_output``, ``[N]`` or ``[N, 1]``) and
a saliency map per input: the graph's Grad-CAM output when it has one, else occlusion
sensitivity computed with forward passes (:mod:`services.core.inference.saliency`). A graph
with a fixed batch of one is fed one input at a time; a single-view model (preprocessing
``views: single``) gets each view's crop on its own and a breast the mean of its two views'.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from services.core.errors import CrgateError, InvalidInput, InvalidParameter, NotFound
from services.core.inference.card import (
    GRAPH_SALIENCY,
    HIRESCAM_OUTPUT,
    SALIENCY_METHODS,
    ModelCard,
    load_card,
)
from services.core.inference.preprocess import Preprocessing, SaliencyGrid
from services.core.inference.saliency import occlusion_saliency

F32 = npt.NDArray[np.float32]
SaliencyMethod = Literal["gradcam", "hirescam", "occlusion"]

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class _GraphInfo:
    input_shape: tuple[int, int]  # (H, W) the graph takes
    saliency_shape: tuple[int, int] | None  # (h, w) of the saliency output, if any
    saliency_output: str | None = None  # the graph output the card's saliency names
    max_batch: int | None = None  # 1 for a graph exported with a fixed batch of one


class Classifier:
    """One ONNX model and its card; build it with :meth:`load` (or :func:`get_classifier`)."""

    def __init__(
        self,
        card: ModelCard,
        card_path: Path,
        model_path: Path,
        session: Any,
        graph: _GraphInfo,
    ) -> None:
        self.card = card
        self.card_path = card_path
        self.model_path = model_path
        self._session = session
        self._graph = graph
        self._lock = threading.Lock()
        self._stamp = _stamp(model_path)  # (size, mtime) when loaded: get_classifier rechecks

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, card_path: Path, providers: list[str] | None = None) -> Classifier:
        """Load and check a model; every failure is one line naming the file and the fix."""
        card_path = Path(card_path)
        card = load_card(card_path)
        model_path = card_path.parent / card.file
        if not model_path.is_file():
            raise NotFound(
                f"ONNX model {model_path} named by model card {card_path} not found: "
                "put the model file beside its card or correct the card's 'file'"
            )
        stamp = _stamp(model_path)
        try:
            model_bytes = model_path.read_bytes()
        except OSError as exc:
            raise NotFound(
                f"ONNX model {model_path} cannot be read ({exc.strerror or exc})"
            ) from None
        # The session is made from the very bytes that were hashed. A graph whose weights live
        # in a separate file (ONNX external data) is refused: the card's sha256 would not cover
        # its weights (see _open_session).
        actual = hashlib.sha256(model_bytes).hexdigest()
        if actual.lower() != card.sha256.strip().lower():
            raise InvalidInput(
                f"ONNX model {model_path} has sha256 {actual} but its card {card_path} says "
                f"{card.sha256}: the file was replaced or damaged; restore it or re-export the "
                "model and its card together"
            )
        chosen = _choose_providers(providers)
        try:
            session = open_session(model_bytes, chosen)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph)
            text = " ".join(str(exc).split()) or type(exc).__name__
            if "external data" in text.lower():
                raise InvalidInput(
                    f"ONNX model {model_path} keeps its weights in a separate file (ONNX external "
                    "data), which its card's sha256 does not cover: re-export it as one file "
                    "(torch.onnx.export(..., external_data=False)) and write a new card"
                ) from None
            raise InvalidInput(
                f"ONNX model {model_path} cannot be opened by onnxruntime {ort.__version__} "
                f"({text}): re-export it (opset {card.opset}) or check the file"
            ) from None
        graph = _check_graph(session, card, card_path, model_path)
        classifier = cls(card, card_path, model_path, session, graph)
        classifier._stamp = stamp
        return classifier

    # ------------------------------------------------------------------ properties

    @property
    def provider(self) -> str:
        """The execution provider that runs the graph (first of the session's providers)."""
        providers: list[str] = self._session.get_providers()
        return providers[0]

    @property
    def preprocessing(self) -> Preprocessing:
        return self.card.preprocess

    @property
    def input_shape(self) -> tuple[int, int]:
        """(H, W) of one breast's input (for a single-view model: both views side by side)."""
        return self.preprocessing.input_shape

    @property
    def saliency_method(self) -> SaliencyMethod:
        output = self._graph.saliency_output
        if output is None:
            return "occlusion"
        return "hirescam" if output == HIRESCAM_OUTPUT else "gradcam"

    @property
    def saliency_shape(self) -> tuple[int, int]:
        """(h, w) of the saliency maps :meth:`predict` returns (the input's for occlusion)."""
        return self._graph.saliency_shape or self.input_shape

    @property
    def saliency_grid(self) -> SaliencyGrid | None:
        """Where the saliency cells lie on the input (the card's Grad-CAM grid); ``None``: the
        map is spread evenly over the input (occlusion maps have the input's size)."""
        return self.card.saliency_grid if self._graph.saliency_output else None

    @property
    def operating_threshold(self) -> float:
        return float(self.card.operating_threshold)

    # ------------------------------------------------------------------ inference

    def predict(
        self,
        inputs: npt.NDArray[Any],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        saliency: bool = True,
    ) -> tuple[F32, F32 | None]:
        """Probabilities ``[N]`` and saliency ``[N, h, w]`` (``None`` when not asked for).

        ``inputs`` is ``[N, 1, H, W]`` as :func:`~services.core.inference.preprocess.breast_input`
        makes them, stacked; they run through the graph ``batch_size`` at a time. A single-view
        model (preprocessing ``views: single``) sees each view's crop on its own; a breast's
        probability is the mean of its two views', and its saliency is occlusion's.
        """
        batch = self._check_inputs(inputs)
        _check_batch_size(batch_size)
        n = batch.shape[0]
        probs = np.empty(n, dtype=np.float32)
        cam_output = self._graph.saliency_output if saliency else None
        want_cam = cam_output is not None
        cams: F32 | None = None
        if want_cam:
            cams = np.empty((n, *self.saliency_shape), dtype=np.float32)
        for start in range(0, n, batch_size):
            chunk = batch[start : start + batch_size]
            p, cam = self._forward(chunk, cam_output)
            probs[start : start + len(chunk)] = p
            if cams is not None and cam is not None:
                cams[start : start + len(chunk)] = cam
        if not saliency:
            return probs, None
        if cams is not None:
            # A graph that divides by a zero peak gives NaN where the map is all zero.
            cams = np.nan_to_num(cams, nan=0.0, posinf=0.0, neginf=0.0)
            return probs, np.clip(cams, 0.0, 1.0)
        maps = occlusion_saliency(
            lambda x: self.probabilities(x, batch_size=batch_size),
            batch,
            baseline=probs,
            batch_size=batch_size,
        )
        return probs, maps

    def probabilities(
        self, inputs: npt.NDArray[Any], *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> F32:
        """Forward passes only: the malignancy probabilities ``[N]``."""
        probs, _ = self.predict(inputs, batch_size=batch_size, saliency=False)
        return probs

    def _forward(self, chunk: F32, cam_output: str | None) -> tuple[F32, F32 | None]:
        """Breast inputs through the graph: probabilities and the saliency output (if asked)."""
        params = self.preprocessing
        single = params.views == "single"
        if single:  # CC crops, then MLO crops: [2k, 1, H, view width]
            width = params.pad_cols
            origins = [params.view_origin(v) for v in ("CC", "MLO")]
            model_inputs = np.concatenate([chunk[..., o : o + width] for o in origins])
        else:
            model_inputs = chunk
        outputs = [self.card.probability_output, *([cam_output] if cam_output else [])]
        step = self._graph.max_batch or len(model_inputs)
        parts = [
            self._run(outputs, np.ascontiguousarray(model_inputs[i : i + step]))
            for i in range(0, len(model_inputs), step)
        ]
        probs = np.concatenate([r[0] for r in parts])
        if single:
            k = chunk.shape[0]
            probs = (probs[:k] + probs[k:]) / np.float32(2)
        cam = np.concatenate([r[1] for r in parts]) if cam_output else None
        return probs, cam

    def _run(self, outputs: list[str], chunk: F32) -> list[F32]:
        feeds = {self.card.input_name: chunk}
        try:
            # InferenceSession.run is thread-safe; the lock keeps one batch in flight per
            # session so that concurrent requests do not multiply the peak memory.
            with self._lock:
                result: list[F32] = self._session.run(outputs, feeds)
        except Exception as exc:
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise CrgateError(
                f"ONNX model {self.model_path} failed on a batch of shape {list(chunk.shape)} on "
                f"{self.provider} ({text}); a smaller batch size may help if memory ran out"
            ) from None
        probs = np.asarray(result[0], dtype=np.float32).reshape(-1)
        if probs.shape[0] != chunk.shape[0]:
            raise InvalidInput(
                f"ONNX model {self.model_path} returned {probs.shape[0]} probabilities for "
                f"{chunk.shape[0]} inputs: its '{self.card.probability_output}' output must be [N]"
            )
        return [probs, *(np.asarray(r, dtype=np.float32) for r in result[1:])]

    def _check_inputs(self, inputs: npt.NDArray[Any]) -> F32:
        h, w = self.input_shape
        array = np.asarray(inputs)
        if array.ndim != 4 or array.shape[1:] != (1, h, w):
            raise InvalidInput(
                f"model {self.card.name} takes inputs [N, 1, {h}, {w}], got {list(array.shape)}: "
                "build them with preprocess.prepare_view/breast_input and the card's preprocessing"
            )
        batch = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(batch).all():
            raise InvalidInput(f"model {self.card.name}: inputs contain NaN or infinite values")
        return batch


# ---------------------------------------------------------------------- checks


def _choose_providers(requested: Sequence[str] | None) -> list[str]:
    available = list(ort.get_available_providers())
    if requested is None:
        return [p for p in (CUDA, CPU) if p in available]
    missing = [p for p in requested if p not in available]
    if missing or not requested:
        raise InvalidParameter(
            f"onnxruntime execution provider(s) {', '.join(missing) or '(none given)'} not "
            f"available; this onnxruntime {ort.__version__} has {', '.join(available)}"
            + (
                " (for CUDA install onnxruntime-gpu: pip install crgate[gpu])"
                if CUDA in missing
                else ""
            )
        )
    return list(requested)


def open_session(model_bytes: bytes, providers: list[str] | None = None) -> Any:
    """An InferenceSession on ``model_bytes`` that cannot read ONNX external data.

    onnxruntime resolves the external data of a model given as bytes against the working
    directory (or a configured folder); pointing it at an empty temporary folder makes every
    external-data model fail to load instead of picking up unverified weights.
    """
    providers = providers or _choose_providers(None)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; warnings about unused providers are noise
    with tempfile.TemporaryDirectory(prefix="crgate-onnx-") as empty:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", empty
        )
        return ort.InferenceSession(model_bytes, sess_options=options, providers=providers)


def _is_dynamic(dim: object) -> bool:
    return not isinstance(dim, int) or dim <= 0


def _shape_text(shape: Sequence[object]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _shapes_agree(graph: Sequence[object], card: Sequence[object]) -> bool:
    """Same rank; each dimension equal where both are fixed (names of dynamic ones may differ)."""
    if len(graph) != len(card):
        return False
    for g, c in zip(graph, card, strict=True):
        if _is_dynamic(g) or _is_dynamic(c):
            if _is_dynamic(g) != _is_dynamic(c):
                return False
            continue
        if g != c:
            return False
    return True


def _check_graph(session: Any, card: ModelCard, card_path: Path, model_path: Path) -> _GraphInfo:
    where = f"ONNX model {model_path} (card {card_path})"
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise InvalidInput(f"{where} has {len(inputs)} inputs ({names}); a classifier takes one")
    graph_input = inputs[0]
    if graph_input.name != card.input_name:
        raise InvalidInput(
            f"{where}: the graph's input is named {graph_input.name!r} but the card says "
            f"{card.input_name!r}: export with input_names=[{card.input_name!r}] or fix the card"
        )
    if graph_input.type != "tensor(float)":
        raise InvalidInput(
            f"{where}: input {graph_input.name!r} is {graph_input.type}, not float32"
        )
    shape = list(graph_input.shape)
    if len(shape) != 4 or shape[1] != 1:
        raise InvalidInput(
            f"{where}: input {graph_input.name!r} has shape {_shape_text(shape)}; expected "
            "[N, 1, H, W] (one greyscale channel)"
        )
    max_batch = None if _is_dynamic(shape[0]) else 1
    if max_batch is not None and shape[0] != 1:
        raise InvalidInput(
            f"{where}: input {graph_input.name!r} has a fixed batch of {shape[0]}; export it "
            "with a dynamic batch dimension N (dynamic_axes) or a batch of 1"
        )
    params = card.preprocess
    expected_hw = params.model_input_shape
    card_shape = list(card.input_shape)
    # the graph may leave H and W open when the card fixes them (the preprocessing makes them)
    graph_fixed = [
        c if _is_dynamic(g) and i >= 2 else g
        for i, (g, c) in enumerate(zip(shape, card_shape, strict=False))
    ]
    if len(card_shape) != 4 or not _shapes_agree(graph_fixed, card_shape):
        raise InvalidInput(
            f"{where}: graph input shape {_shape_text(shape)} does not match the card's "
            f"input_shape {_shape_text(card_shape)}"
        )
    graph_hw = tuple(graph_fixed[2:])
    if any(_is_dynamic(d) for d in graph_hw):
        raise InvalidInput(
            f"{where}: input height and width must be fixed in the graph or the card, got "
            f"{_shape_text(shape)}"
        )
    if graph_hw != expected_hw:
        raise InvalidInput(
            f"{where}: input is {graph_hw[0]}x{graph_hw[1]} but the card's preprocessing makes "
            f"{expected_hw[0]}x{expected_hw[1]}: the card's preprocessing does not fit this model"
        )

    graph_outputs = {o.name: list(o.shape) for o in session.get_outputs()}
    if set(graph_outputs) != set(card.outputs):
        raise InvalidInput(
            f"{where}: the graph's outputs are {sorted(graph_outputs)} but the card lists "
            f"{sorted(card.outputs)}: re-export the model or correct the card's 'outputs'"
        )
    probability = card.probability_output
    if probability not in graph_outputs:
        raise InvalidInput(
            f"{where}: no {probability!r} output; a classifier must output the malignancy "
            "probability [N] (the card's probability_output names it)"
        )
    for name, graph_shape in graph_outputs.items():
        if not _shapes_agree(graph_shape, card.outputs[name]):
            raise InvalidInput(
                f"{where}: output {name!r} has shape {_shape_text(graph_shape)} but the card "
                f"says {_shape_text(card.outputs[name])}"
            )
    prob_shape = graph_outputs[probability]
    if not is_probability_shape(prob_shape, max_batch):
        raise InvalidInput(
            f"{where}: output {probability!r} has shape {_shape_text(prob_shape)}; "
            "expected [N] or [N, 1]"
        )
    if card.saliency not in SALIENCY_METHODS:
        raise InvalidInput(
            f"{where}: the card's saliency is {card.saliency!r}; use "
            + ", ".join(repr(m) for m in SALIENCY_METHODS)
        )
    cam_shapes: dict[str, tuple[int, int]] = {}
    for name in GRAPH_SALIENCY.values():
        if name not in graph_outputs:
            continue
        cam = graph_outputs[name]
        if (
            len(cam) != 3
            or not _is_batch(cam[0], max_batch)
            or any(_is_dynamic(d) for d in cam[1:])
        ):
            raise InvalidInput(
                f"{where}: output {name!r} has shape {_shape_text(cam)}; expected "
                "[N, h, w] with fixed h and w"
            )
        cam_shapes[name] = (int(cam[1]), int(cam[2]))
    saliency_output = GRAPH_SALIENCY.get(card.saliency)
    if saliency_output is not None and params.views == "single":
        raise InvalidInput(
            f"{where}: a single-view model's saliency must be 'occlusion' (the card says "
            f"{card.saliency!r}): an in-graph map covers one view, not the breast"
        )
    if saliency_output is not None and saliency_output not in cam_shapes:
        raise InvalidInput(
            f"{where}: the card's saliency is {card.saliency!r} but the graph has no "
            f"{saliency_output!r} output: set saliency to one of "
            + ", ".join(repr(m) for m in (*_methods_in(cam_shapes), "occlusion"))
            + " or export the model with WithGradCam"
        )
    saliency_shape = cam_shapes.get(saliency_output) if saliency_output else None
    if saliency_shape is not None and card.gradcam_grid is not None:
        grid = card.gradcam_grid
        _check_grid(where, grid.stride, grid.offset, saliency_shape, graph_hw)
    return _GraphInfo(
        input_shape=(int(graph_hw[0]), int(graph_hw[1])),
        saliency_shape=saliency_shape,
        saliency_output=saliency_output,
        max_batch=max_batch,
    )


def _is_batch(dim: object, max_batch: int | None) -> bool:
    return _is_dynamic(dim) or (max_batch is not None and dim == max_batch)


def is_probability_shape(shape: Sequence[object], max_batch: int | None = None) -> bool:
    """[N] or [N, 1]: one probability per input."""
    return (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) and _is_batch(
        shape[0], max_batch
    )


def _methods_in(outputs: dict[str, Any]) -> list[str]:
    return [method for method, name in GRAPH_SALIENCY.items() if name in outputs]


def _check_grid(
    where: str,
    stride: tuple[float, float],
    offset: tuple[float, float],
    cells: tuple[int, int],
    input_hw: tuple[Any, ...],
) -> None:
    """The card's Grad-CAM grid must put every cell centre on the input."""
    for axis, name in ((0, "rows"), (1, "columns")):
        first = offset[axis]
        last = offset[axis] + stride[axis] * (cells[axis] - 1)
        if stride[axis] <= 0 or first < -0.5 or last > int(input_hw[axis]) - 0.5:
            raise InvalidInput(
                f"{where}: the card's gradcam_grid (stride {stride[axis]:g}, offset "
                f"{offset[axis]:g}) puts the {cells[axis]} cell {name} outside the input's "
                f"{input_hw[axis]} {name}: correct the card's gradcam_grid"
            )


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidParameter(f"batch size must be a positive integer, got {batch_size!r}")


# ---------------------------------------------------------------------- one session per process

_CACHE: dict[tuple[Path, str, tuple[str, ...] | None], Classifier] = {}
_CACHE_LOCK = threading.Lock()


def get_classifier(card_path: Path, providers: list[str] | None = None) -> Classifier:
    """The process's classifier for ``card_path``, loaded on first use.

    Keyed by the card's resolved path and the model sha256 it names, so a new card (a new model)
    is loaded afresh; a model file whose size or time changed is checked again.
    """
    path = Path(card_path).resolve()
    card = load_card(path)
    key = (path, card.sha256.strip().lower(), tuple(providers) if providers is not None else None)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is not None and _unchanged(cached):
            return cached
        classifier = Classifier.load(path, providers)
        _CACHE[key] = classifier
        return classifier


def clear_cache() -> None:
    """Forget every cached session (tests; a model reload)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _unchanged(classifier: Classifier) -> bool:
    return classifier._stamp is not None and classifier._stamp == _stamp(classifier.model_path)


__all__ = [
    "CPU",
    "CUDA",
    "DEFAULT_BATCH_SIZE",
    "Classifier",
    "SaliencyMethod",
    "clear_cache",
    "get_classifier",
    "is_probability_shape",
    "open_session",
]
