"""The saliency panel (the seed study's Fig. 3): one malignant breast at CR 1 and up to three
of the CRs the study was asked for (1, 100, 5K and 11K when they were), each view overlaid with
the model's saliency on the copy it was shown.

The case is the malignant breast the model scores highest at CR 1 (a case it finds on the
original), its CC view when it has one. Phantoms' ground truth (lesion centre and radius from
truth.csv) is drawn as a circle on the original.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from services.core.inference.overlay import render_preview
from services.core.inference.preprocess import breast_input, map_back, prepare_view
from services.core.inference.runtime import Classifier
from services.lab.safety.copies import CopyCache, Quality, ViewCopy
from services.lab.safety.labels import LabelledBreast

PANEL_CRS = (1.0, 100.0, 5000.0, 11000.0)
MAX_SIDE = 512


@dataclass(frozen=True)
class Tile:
    cr: float
    probability: float
    quality: Quality
    image: Image.Image


@dataclass(frozen=True)
class SaliencyPanel:
    breast: LabelledBreast
    view: str
    method: str  # hirescam, gradcam or occlusion
    original: Image.Image  # the original, ground truth drawn when known
    tiles: list[Tile]


def panel_crs(crs: Sequence[float], tiles: int = len(PANEL_CRS)) -> tuple[float, ...]:
    """CR 1 and at most ``tiles - 1`` of the asked ``crs``: the seed study's (100, 5K, 11K)
    among them first, the rest spread evenly over the asked list; never a CR not asked for."""
    asked = sorted({float(c) for c in crs if c != 1})
    chosen = [c for c in PANEL_CRS[1:] if c in asked][: tiles - 1]
    rest = [c for c in asked if c not in chosen]
    free = tiles - 1 - len(chosen)
    if free > 0 and rest:
        picks = np.unique(np.linspace(0, len(rest) - 1, min(free, len(rest))).round().astype(int))
        chosen += [rest[i] for i in picks]
    return (1.0, *sorted(chosen))


def pick_case(
    breasts: Sequence[LabelledBreast], probabilities_at_1: Sequence[float]
) -> LabelledBreast:
    """The malignant breast with the highest probability at CR 1."""
    ranked = [
        (p, -i)
        for i, (b, p) in enumerate(zip(breasts, probabilities_at_1, strict=True))
        if b.label == 1
    ]
    if not ranked:
        raise ValueError("no malignant breast in the set")
    _, neg = max(ranked)
    return breasts[-neg]


def saliency_panel(
    classifier: Classifier,
    breast: LabelledBreast,
    cache: CopyCache,
    crs: Sequence[float] = PANEL_CRS,
) -> SaliencyPanel:
    view = "CC" if "CC" in breast.views else next(iter(breast.views))
    params = classifier.preprocessing
    tiles = []
    original: Image.Image | None = None
    for cr in crs:
        copies: dict[str, ViewCopy] = {}
        crops = []
        for half, file in breast.input_files():
            copy = copies.get(str(file)) or cache.view(file, cr)
            copies[str(file)] = copy
            crops.append(
                prepare_view(
                    copy.pixels,
                    half,
                    breast.laterality,
                    params,
                    bits_stored=copy.bits_stored,
                    photometric=copy.photometric,
                )
            )
        x = breast_input(crops[0], crops[1], params).astype(np.float32)[np.newaxis]
        probs, maps = classifier.predict(x, batch_size=1, saliency=True)
        assert maps is not None
        shown = copies[str(breast.views[view])]
        rows, cols = shown.pixels.shape
        saliency = map_back(
            maps[0], view, breast.laterality, params, rows, cols, classifier.saliency_grid
        )
        if len(breast.views) == 1:  # the view filled both halves: take the larger of the two
            other = "MLO" if view == "CC" else "CC"
            twin = map_back(
                maps[0], other, breast.laterality, params, rows, cols, classifier.saliency_grid
            )
            saliency = np.maximum(saliency, twin)
        if cr == 1:
            original = _preview(shown, np.zeros_like(saliency))
            _draw_truth(original, breast, view, rows)
        tile = _preview(shown, np.clip(saliency, 0, 1))
        tiles.append(Tile(cr, float(probs[0]), shown.quality, tile))
    if original is None:  # CR 1 not among the panel's CRs: the original from the cache
        shown = cache.view(breast.views[view], 1.0)
        rows = shown.pixels.shape[0]
        original = _preview(shown, np.zeros(shown.pixels.shape, dtype=np.float32))
        _draw_truth(original, breast, view, rows)
    return SaliencyPanel(breast, view, classifier.saliency_method, original, tiles)


def _preview(copy: ViewCopy, saliency: npt.NDArray[np.float32]) -> Image.Image:
    return render_preview(
        copy.pixels,
        saliency,
        bits_stored=copy.bits_stored,
        photometric=copy.photometric,
        window=copy.window,
        max_side=MAX_SIDE,
    )


def _draw_truth(image: Image.Image, breast: LabelledBreast, view: str, rows: int) -> None:
    lesion = breast.lesions.get(view)
    if lesion is None:
        return
    scale = image.height / rows
    x, y, r = (v * scale for v in lesion)
    r = max(r * 1.6, 6.0)
    ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), outline=(255, 40, 40), width=2)
