"""Model cards: the JSON file beside each ONNX model that says what it is and how to feed it.

A card names the ONNX file and its sha256, the input and output tensors, the preprocessing
(:class:`~services.core.inference.preprocess.Preprocessing`), what it was trained on and how
well it did per test CR. The runtime refuses a model whose file or graph does not match.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.core.errors import InvalidInput, NotFound
from services.core.inference.preprocess import Preprocessing, SaliencyGrid

INPUT_NAME = "image"
PROBABILITY_OUTPUT = "malignancy"
GRADCAM_OUTPUT = "gradcam"
HIRESCAM_OUTPUT = "hirescam"
# saliency methods computed inside the graph, by the output that carries each
GRAPH_SALIENCY = {"gradcam": GRADCAM_OUTPUT, "hirescam": HIRESCAM_OUTPUT}
SALIENCY_METHODS = (*GRAPH_SALIENCY, "occlusion")


class MetricWithCI(BaseModel):
    value: float
    ci_low: float
    ci_high: float


class TestResult(BaseModel):
    """Performance on the held-out phantom test set compressed at one CR."""

    cr: float
    auroc: MetricWithCI
    auprc: MetricWithCI
    n_breasts: int
    n_malignant: int
    mean_psnr_db: float | None = None
    mean_achieved_cr: float | None = None


class GradCamGrid(BaseModel):
    """Receptive-field centres of the ``gradcam`` output's cells on the input, in input pixels:
    cell ``(i, j)`` is centred on ``(offset[0] + stride[0] * i, offset[1] + stride[1] * j)``."""

    stride: tuple[float, float]
    offset: tuple[float, float]


class ImageGeometry(BaseModel):
    """The images a model was trained on: columns x rows and the pixel spacing (mm)."""

    cols: int = Field(gt=0)
    rows: int = Field(gt=0)
    pixel_spacing_mm: float | None = Field(None, gt=0)


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    file: str = Field(description="ONNX file name, relative to the card")
    sha256: str
    architecture: str
    framework: str = "onnx"
    opset: int
    input_name: str = INPUT_NAME
    input_shape: list[int | str] = Field(description="[N, 1, H, W]; N is dynamic")
    outputs: dict[str, list[int | str]] = Field(description="output name -> shape")
    probability_output: str = Field(
        PROBABILITY_OUTPUT, description="the output that is the malignancy probability, [N]"
    )
    saliency: str = Field(
        description="the map the service shows: gradcam or hirescam (outputs of the graph) "
        "or occlusion (computed by the runtime)"
    )
    gradcam_grid: GradCamGrid | None = Field(
        None,
        description="where the gradcam/hirescam cells lie on the input; absent: spread evenly",
    )
    preprocessing: dict[str, Any]
    operating_threshold: float = 0.5
    training: dict[str, Any] = Field(default_factory=dict)
    test_results: list[TestResult] = Field(default_factory=list)
    intended_use: str = "research on synthetic phantoms; not for clinical use"
    trained_geometry: ImageGeometry | None = Field(
        None, description="the training images' size and spacing; classify warns far from it"
    )

    @property
    def preprocess(self) -> Preprocessing:
        return Preprocessing.from_dict(self.preprocessing)

    @property
    def saliency_grid(self) -> SaliencyGrid | None:
        grid = self.gradcam_grid
        return None if grid is None else SaliencyGrid(grid.stride, grid.offset)

    @property
    def has_gradcam(self) -> bool:
        return GRADCAM_OUTPUT in self.outputs


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_card(card_path: Path) -> ModelCard:
    """Read and validate a card; raise one clear line when it is missing or malformed."""
    try:
        data = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise NotFound(f"model card {card_path} not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"model card {card_path} is not readable JSON ({exc})") from None
    try:
        card = ModelCard.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"model card {card_path}: {where}: {first['msg']}") from None
    card.preprocess  # noqa: B018 - validates the preprocessing block
    return card


def write_card(card: ModelCard, card_path: Path) -> None:
    card_path.write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
