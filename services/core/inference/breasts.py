"""From DICOM mammograms to breasts, and from breasts to probabilities and saliency maps.

:func:`group_breasts` sorts "for presentation" MG images into breasts (study, laterality) with
a CC and an MLO view; :func:`classify_breasts` runs a :class:`~.runtime.Classifier` on them and
maps each saliency map back onto the original views' pixel grids.

What is accepted, and what happens otherwise:

* modality MG, one frame, one greyscale sample (MONOCHROME1/2), unsigned pixels: else
  InvalidInput naming the file;
* laterality from ImageLaterality, else Laterality, else the per-frame FrameLaterality of the
  shared functional groups; none of them L or R: InvalidInput;
* view from ViewPosition, else the ViewCodeSequence code: only CC and MLO, the views the
  classifiers are trained on (ML, LM, XCCL ... are refused);
* two images of the same breast and view in one study: InvalidInput naming both files;
* a breast with only one of the two views: that view fills both halves of the input, and the
  breast's ``fallback`` says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from services.core.dicom.pixels import load_pixels
from services.core.errors import InvalidInput, InvalidParameter
from services.core.inference.preprocess import (
    LATERALITIES,
    VIEW_KINDS,
    breast_input,
    map_back,
    prepare_view,
)
from services.core.inference.runtime import DEFAULT_BATCH_SIZE, Classifier, SaliencyMethod

F32 = npt.NDArray[np.float32]

# SNOMED CT and the older SNOMED-RT (DICOM CID 4014) codes of the two views.
_VIEW_CODES = {
    "399162004": "CC",
    "R-10242": "CC",
    "399368009": "MLO",
    "R-10226": "MLO",
}


@dataclass(frozen=True)
class ViewImage:
    """One view of one breast: stored values as decoded, and what is needed to display them."""

    sop_instance_uid: str
    pixels: npt.NDArray[Any]  # 2-D stored values
    bits_stored: int
    photometric: str  # MONOCHROME1 or MONOCHROME2
    rows: int
    cols: int
    source: str = ""
    window: tuple[float, float] | None = None  # (center, width) from the dataset, if any


@dataclass
class Breast:
    study_uid: str
    laterality: str  # "L" or "R"
    views: dict[str, ViewImage] = field(default_factory=dict)  # "CC"/"MLO" -> view
    fallback: str | None = None

    def input_views(self) -> tuple[ViewImage, ViewImage]:
        """The (CC, MLO) images that make the input; one view stands in for a missing one."""
        cc = self.views.get("CC")
        mlo = self.views.get("MLO")
        if cc is not None and mlo is not None:
            return cc, mlo
        only = cc if cc is not None else mlo
        if only is None:
            raise InvalidInput(f"study {self.study_uid} {self.laterality} breast has no views")
        return only, only


@dataclass(frozen=True)
class ViewSaliency:
    sop_instance_uid: str
    source: str
    saliency: F32  # [rows, cols] on the view's original grid, in [0, 1]


@dataclass(frozen=True)
class BreastResult:
    study_uid: str
    laterality: str
    probability: float
    threshold: float
    saliency_method: SaliencyMethod
    fallback: str | None
    views: dict[str, ViewSaliency]


# ---------------------------------------------------------------------- grouping


def group_breasts(datasets: Iterable[tuple[str, Dataset]]) -> list[Breast]:
    """Breasts (study, laterality) with their CC and MLO views, in the order first seen."""
    breasts: dict[tuple[str, str], Breast] = {}
    sources: dict[tuple[str, str, str], str] = {}
    for source, ds in datasets:
        study_uid = _study_uid(ds, source)
        laterality = _laterality(ds, source)
        view = _view(ds, source)
        key = (study_uid, laterality, view)
        if key in sources:
            raise InvalidInput(
                f"{sources[key]} and {source} are both the {laterality} {view} view of study "
                f"{study_uid}: send one image per breast and view"
            )
        image = _view_image(ds, source)
        sources[key] = source
        breast = breasts.setdefault((study_uid, laterality), Breast(study_uid, laterality))
        breast.views[view] = image
    for breast in breasts.values():
        for present, missing in (("CC", "MLO"), ("MLO", "CC")):
            if present in breast.views and missing not in breast.views:
                breast.fallback = (
                    f"{missing} view missing: {present} view used for both halves of the input"
                )
    order = {uid: i for i, (uid, _) in enumerate(breasts)}
    return sorted(breasts.values(), key=lambda b: (order[b.study_uid], b.laterality))


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if not isinstance(value, str | bytes) and hasattr(value, "__len__"):
        value = value[0] if len(value) else ""  # a multi-valued element: its first value
    return str(value).strip().upper()


def _study_uid(ds: Dataset, source: str) -> str:
    modality = _text(ds, "Modality")
    if modality != "MG":
        what = f"is modality {modality}" if modality else "has no Modality (0008,0060)"
        raise InvalidInput(f"{source}: {what}, not MG: the classifier reads mammograms only")
    uid = str(ds.get("StudyInstanceUID", "") or "").strip()
    if not uid:
        raise InvalidInput(
            f"{source}: no StudyInstanceUID (0020,000D): cannot tell which study and breast the "
            "image belongs to"
        )
    return uid


def _laterality(ds: Dataset, source: str) -> str:
    for keyword in ("ImageLaterality", "Laterality"):
        value = _text(ds, keyword)
        if value in LATERALITIES:
            return value
    frame = _frame_laterality(ds)
    if frame in LATERALITIES:
        return frame
    found = ", ".join(f"{k}={_text(ds, k)!r}" for k in ("ImageLaterality", "Laterality") if k in ds)
    raise InvalidInput(
        f"{source}: no breast laterality (ImageLaterality (0020,0062) or Laterality (0020,0060) "
        f"L or R{'; found ' + found if found else ''}): set ImageLaterality to L or R"
    )


def _frame_laterality(ds: Dataset) -> str:
    try:
        shared = ds.SharedFunctionalGroupsSequence[0]
        return str(shared.FrameAnatomySequence[0].FrameLaterality).strip().upper()
    except (AttributeError, IndexError, KeyError):
        return ""


def _view(ds: Dataset, source: str) -> str:
    position = _text(ds, "ViewPosition")
    if not position:
        position = _view_from_code(ds)
    if position in VIEW_KINDS:
        return position
    shown = repr(position) if position else "missing (no ViewPosition or ViewCodeSequence)"
    raise InvalidInput(
        f"{source}: view position {shown} is not CC or MLO: the classifier reads CC and MLO "
        "views only"
    )


def _view_from_code(ds: Dataset) -> str:
    try:
        code = str(ds.ViewCodeSequence[0].CodeValue).strip()
    except (AttributeError, IndexError, KeyError):
        return ""
    return _VIEW_CODES.get(code, "")


def _view_image(ds: Dataset, source: str) -> ViewImage:
    decoded = load_pixels(ds, source)
    layout = decoded.layout
    if layout.frames != 1:
        raise InvalidInput(
            f"{source}: {layout.frames} frames; the classifier reads single-frame mammograms "
            "(not tomosynthesis)"
        )
    if decoded.photometric not in ("MONOCHROME1", "MONOCHROME2") or layout.samples != 1:
        raise InvalidInput(
            f"{source}: photometric interpretation {decoded.photometric}: the classifier reads "
            "greyscale (MONOCHROME1/2) images only"
        )
    if layout.signed:
        raise InvalidInput(
            f"{source}: signed pixel values (PixelRepresentation 1): mammograms for "
            "presentation are unsigned; the classifier cannot normalise these"
        )
    sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    return ViewImage(
        sop_instance_uid=sop_uid,
        pixels=decoded.frames[0],
        bits_stored=layout.bits_stored,
        photometric=decoded.photometric,
        rows=layout.rows,
        cols=layout.columns,
        source=source,
        window=window_of(ds),
    )


def window_of(ds: Dataset) -> tuple[float, float] | None:
    """(WindowCenter, WindowWidth) of a dataset (the first pair), or None when absent/invalid."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c = float(center[0] if _multi(center) else center)
        w = float(width[0] if _multi(width) else width)
    except (TypeError, ValueError, IndexError):
        return None
    if not (np.isfinite(c) and np.isfinite(w)) or w <= 0:
        return None
    return c, w


def _multi(value: object) -> bool:
    return not isinstance(value, str | bytes | int | float) and hasattr(value, "__getitem__")


# ---------------------------------------------------------------------- classification


def breast_inputs(classifier: Classifier, breasts: list[Breast]) -> F32:
    """``[N, 1, H, W]``: each breast's CC and MLO views prepared as in training."""
    params = classifier.preprocessing
    out = np.empty((len(breasts), 1, *params.input_shape), dtype=np.float32)
    for i, breast in enumerate(breasts):
        cc, mlo = breast.input_views()
        out[i] = breast_input(
            _prepare(cc, "CC", breast.laterality, classifier),
            _prepare(mlo, "MLO", breast.laterality, classifier),
            params,
        )
    return out


def _prepare(image: ViewImage, view: str, laterality: str, classifier: Classifier) -> F32:
    return prepare_view(
        image.pixels,
        view,
        laterality,
        classifier.preprocessing,
        bits_stored=image.bits_stored,
        photometric=image.photometric,
    )


def classify_breasts(
    classifier: Classifier,
    breasts: Iterable[Breast],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    saliency: bool = True,
) -> list[BreastResult]:
    """Probability and per-view saliency (original pixel grid) of each breast.

    Breasts are prepared and run ``batch_size`` at a time, so memory stays bounded for large
    studies. For a breast with one view, that view's map is the larger of the two halves' maps.
    With ``saliency=False`` only the probabilities are computed (``views`` is then empty).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidParameter(f"batch size must be a positive integer, got {batch_size!r}")
    items = list(breasts)
    params = classifier.preprocessing
    grid = classifier.saliency_grid
    results: list[BreastResult] = []
    for start in range(0, len(items), batch_size):
        part = items[start : start + batch_size]
        probs, maps = classifier.predict(
            breast_inputs(classifier, part), batch_size=batch_size, saliency=saliency
        )
        cams = list(maps) if maps is not None else [None] * len(part)
        for breast, prob, cam in zip(part, probs, cams, strict=True):
            views: dict[str, ViewSaliency] = {}
            for view, image in breast.views.items():
                if cam is None:
                    continue
                mapped = map_back(
                    cam, view, breast.laterality, params, image.rows, image.cols, grid
                )
                if breast.fallback is not None:  # the same image also filled the other half
                    other = "MLO" if view == "CC" else "CC"
                    twin = map_back(
                        cam, other, breast.laterality, params, image.rows, image.cols, grid
                    )
                    mapped = np.maximum(mapped, twin)
                views[view] = ViewSaliency(
                    sop_instance_uid=image.sop_instance_uid,
                    source=image.source,
                    saliency=np.clip(mapped, 0.0, 1.0).astype(np.float32, copy=False),
                )
            results.append(
                BreastResult(
                    study_uid=breast.study_uid,
                    laterality=breast.laterality,
                    probability=float(prob),
                    threshold=classifier.operating_threshold,
                    saliency_method=classifier.saliency_method,
                    fallback=breast.fallback,
                    views=views,
                )
            )
    return results
