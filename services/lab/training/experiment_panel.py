"""The seed study's Fig. 3 for the same-cr experiment: one malignant test breast, and the models
trained on CR 1, 100, 5K and 11K each shown the copy at its own CR, with its saliency.

The case is the malignant test breast that M-CR1 scores highest on the original (a case the
model finds). Each tile is the CC view as the model sees it (the preprocessed crop of the copy,
scaled up twice) with the model's HiResCAM over it (the shipped model's saliency; Grad-CAM
credits positions CNN3's head does not use, docs/classifier.md), its probability and the copy's
PSNR; the first tile is the original with the phantom's lesion circled.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, ImageDraw, ImageFont

from models.architectures import Classifier
from models.gradcam import WithGradCam
from services.core.inference.overlay import render_overlay
from services.core.inference.preprocess import SaliencyGrid, breast_input, to_input_grid
from services.lab.safety.plots import cr_label
from services.lab.training.data import BreastRecord, CompressedCache

PANEL_CRS = (1.0, 100.0, 5000.0, 11000.0)
VIEW = "CC"
SCALE = 2  # tiles are the model's crop (about 250 x 125 px) scaled up for reading
CAPTION = 34  # pixels of caption above each tile


def same_cr_panel(
    models: Mapping[float, Classifier],
    test_set: Sequence[BreastRecord],
    cache: CompressedCache,
    data_dir: Path,
) -> Image.Image | None:
    """The panel, or None when M-CR1 or a malignant test breast is missing."""
    if 1.0 not in models:
        return None
    malignant = [r for r in test_set if r.label == 1]
    if not malignant:
        return None
    case = max(malignant, key=lambda r: _run(models[1.0], r, cache, 1.0)[0])
    crop, blank, lesion = _original(case, cache, data_dir)
    tiles = [_tile(crop, blank, "original (CR 1), lesion circled", lesion)]
    for cr in PANEL_CRS:
        if cr not in models:
            continue
        probability, saliency, crop, psnr = _run(models[cr], case, cache, cr)
        psnr_text = "exact" if psnr >= 100 else f"{psnr:.1f} dB"
        caption = f"M-CR{cr_label(cr)} on CR {cr_label(cr)}: p = {probability:.2f}, {psnr_text}"
        tiles.append(_tile(crop, saliency, caption))
    width = sum(t.width for t in tiles) + 8 * (len(tiles) - 1)
    panel = Image.new("RGB", (width, max(t.height for t in tiles)), (0, 0, 0))
    x = 0
    for tile in tiles:
        panel.paste(tile, (x, 0))
        x += tile.width + 8
    return panel


def _run(
    model: Classifier, case: BreastRecord, cache: CompressedCache, cr: float
) -> tuple[float, npt.NDArray[np.float32], npt.NDArray[np.float32], float]:
    """Probability, HiResCAM over the CC crop, the CC crop and its PSNR at ``cr``."""
    params = cache.params
    cc, mlo = (cache.get(case.files[v], v, case.laterality, cr) for v in ("CC", "MLO"))
    x = torch.from_numpy(breast_input(cc.crop, mlo.crop, params).astype(np.float32)[np.newaxis])
    model.eval()
    with torch.no_grad():
        prob, _, hirescam = WithGradCam(model, hirescam=True)(x)
    stride, offset = model.cam_grid()
    full = to_input_grid(hirescam[0].numpy(), params, SaliencyGrid(stride, offset))
    left = params.view_origin(VIEW)
    saliency = full[: params.crop_rows, left : left + params.crop_cols]
    return float(prob[0]), saliency, cc.crop.astype(np.float32), cc.psnr_db


def _original(
    case: BreastRecord, cache: CompressedCache, data_dir: Path
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], tuple[float, float, float] | None]:
    crop = cache.get(case.files[VIEW], VIEW, case.laterality, 1.0).crop.astype(np.float32)
    return crop, np.zeros_like(crop), _lesion_in_crop(case, cache, data_dir)


def _lesion_in_crop(
    case: BreastRecord, cache: CompressedCache, data_dir: Path
) -> tuple[float, float, float] | None:
    """The CC lesion's centre and radius (truth.csv, original pixels) on the model's crop."""
    with (data_dir / "truth.csv").open(newline="") as fh:
        rows = [
            r
            for r in csv.DictReader(fh)
            if r["study_uid"] == case.study_uid
            and r["laterality"] == case.laterality
            and r["view"] == VIEW
            and r["center_x"]
        ]
    if not rows:
        return None
    import pydicom

    ds = pydicom.dcmread(case.files[VIEW], stop_before_pixels=True)
    params = cache.params
    sx, sy = params.view_cols / int(ds.Columns), params.view_rows / int(ds.Rows)
    top, _, left, _ = params.crop_box(VIEW, case.laterality)
    x = (float(rows[0]["center_x"]) + 0.5) * sx - 0.5 - left
    y = (float(rows[0]["center_y"]) + 0.5) * sy - 0.5 - top
    if case.laterality == "R" and params.mirror_right:
        x = params.crop_cols - 1 - x
    return x, y, float(rows[0]["radius_px"]) * sx


def _tile(
    crop: npt.NDArray[np.float32],
    saliency: npt.NDArray[np.float32],
    title: str,
    lesion: tuple[float, float, float] | None = None,
) -> Image.Image:
    """One tile: the crop with the saliency blended in, scaled up, a caption above."""
    stored = np.clip(crop * 4095.0 + 0.5, 0, 4095).astype(np.uint16)
    image = render_overlay(
        stored, np.clip(saliency, 0.0, 1.0), bits_stored=12, window=(2047.5, 4095.0)
    )
    image = image.resize((image.width * SCALE, image.height * SCALE), Image.Resampling.BILINEAR)
    tile = Image.new("RGB", (image.width, image.height + CAPTION), (0, 0, 0))
    tile.paste(image, (0, CAPTION))
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default(size=13)
    draw.text((4, 2), _wrap(title, draw, font, image.width - 8), fill=(255, 255, 255), font=font)
    if lesion is not None:
        x, y, r = (v * SCALE for v in lesion)
        r = max(r * 1.6, 8.0)
        box = (x - r, y - r + CAPTION, x + r, y + r + CAPTION)
        draw.ellipse(box, outline=(255, 40, 40), width=2)
    return tile


def _wrap(
    text: str,
    draw: ImageDraw.ImageDraw,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    width: int,
) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) > width and line:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    return "\n".join(lines)
