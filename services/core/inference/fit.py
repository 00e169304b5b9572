"""Does an image look like what the model was trained on? Warnings, not errors.

The preprocessing scales every view to the card's fixed grid, so what matters is the physical
field of view and the shape: a detector whose field is much larger or smaller than the training
images' puts lesions at another scale on the grid, and a much finer or coarser pixel spacing
changes what detail survives. An image is *far outside* when, against the card's
``trained_geometry``:

* its pixel spacing differs by more than a factor :data:`SPACING_FACTOR` (5; the shipped models
  read the seed study's 0.07 mm as well as their own 0.28 mm),
* its field of view (rows and columns times the spacing) by more than :data:`FIELD_FACTOR` (1.5),
* or its aspect ratio by more than :data:`ASPECT_TOLERANCE` (20 %).

Without a spacing in the image (Pixel Spacing or Imager Pixel Spacing) only the aspect is checked.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.dataset import Dataset

from services.core.inference.card import ImageGeometry, ModelCard

SPACING_FACTOR = 5.0
FIELD_FACTOR = 1.5
ASPECT_TOLERANCE = 0.2


def _spacing(ds: Dataset) -> float | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            spacing = float(value[0]) if value else 0.0
        except (TypeError, ValueError, IndexError):
            continue
        if spacing > 0:
            return spacing
    return None


def _off(a: float, b: float, factor: float) -> bool:
    return max(a / b, b / a) > factor


def geometry_problems(
    trained: ImageGeometry, cols: int, rows: int, spacing: float | None
) -> list[str]:
    """What is far outside ``trained`` about one image (empty: nothing)."""
    problems = []
    aspect, trained_aspect = rows / cols, trained.rows / trained.cols
    if abs(aspect / trained_aspect - 1) > ASPECT_TOLERANCE:
        problems.append(f"aspect {rows / cols:.2f} (rows/columns) against {trained_aspect:.2f}")
    known = trained.pixel_spacing_mm
    if spacing is not None and known is not None:
        if _off(spacing, known, SPACING_FACTOR):
            problems.append(f"pixel spacing {spacing:g} mm against {known:g} mm")
        field = (cols * spacing, rows * spacing)
        trained_field = (trained.cols * known, trained.rows * known)
        if any(_off(a, b, FIELD_FACTOR) for a, b in zip(field, trained_field, strict=True)):
            problems.append(
                f"field of view {field[0]:.0f} x {field[1]:.0f} mm against "
                f"{trained_field[0]:.0f} x {trained_field[1]:.0f} mm"
            )
    return problems


def geometry_warnings(card: ModelCard, datasets: Iterable[tuple[str, Dataset]]) -> list[str]:
    """One line per distinct image geometry far outside the card's training images."""
    trained = card.trained_geometry
    if trained is None:
        return []
    seen: dict[tuple[int, int, float | None], list[str]] = {}
    for source, ds in datasets:
        try:
            key = (int(ds.Columns), int(ds.Rows), _spacing(ds))
        except (AttributeError, TypeError, ValueError):
            continue
        seen.setdefault(key, []).append(source)
    lines = []
    for (cols, rows, spacing), sources in seen.items():
        problems = geometry_problems(trained, cols, rows, spacing)
        if not problems:
            continue
        what = f"{cols}x{rows}" + ("" if spacing is None else f" at {spacing:g} mm")
        more = f" and {len(sources) - 1} more" if len(sources) > 1 else ""
        lines.append(
            f"{sources[0]}{more}: {what} is far from the {trained.cols}x{trained.rows}"
            + ("" if trained.pixel_spacing_mm is None else f" at {trained.pixel_spacing_mm:g} mm")
            + f" images model {card.name} {card.version} was trained on ("
            + "; ".join(problems)
            + "): its probabilities may not mean what its card says"
        )
    return lines
