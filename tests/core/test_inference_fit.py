"""The geometry check behind `crgate classify`'s warnings (services/core/inference/fit.py)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from services.core.inference.card import ImageGeometry, load_card
from services.core.inference.fit import geometry_problems, geometry_warnings
from tests.core.test_classifier_shipped import CARD

TRAINED = ImageGeometry(cols=832, rows=1024, pixel_spacing_mm=0.28)


@pytest.mark.parametrize(
    ("cols", "rows", "spacing"),
    [(832, 1024, 0.28), (3328, 4096, 0.07), (416, 512, 0.56), (900, 1024, 0.28), (832, 1024, None)],
)
def test_close_enough(cols: int, rows: int, spacing: float | None) -> None:
    assert geometry_problems(TRAINED, cols, rows, spacing) == []


@pytest.mark.parametrize(
    ("cols", "rows", "spacing", "problem"),
    [
        (1024, 832, 0.28, "aspect 0.81 (rows/columns) against 1.23"),
        (1024, 832, None, "aspect 0.81"),
        (3328, 4096, 0.05, "pixel spacing 0.05 mm against 0.28 mm"),
        (832, 1024, 0.14, "field of view 116 x 143 mm against 233 x 287 mm"),
        (832, 1024, 0.5, "field of view 416 x 512 mm"),
    ],
)
def test_far_outside(cols: int, rows: int, spacing: float | None, problem: str) -> None:
    problems = geometry_problems(TRAINED, cols, rows, spacing)
    assert any(p.startswith(problem) for p in problems), problems


def _image(cols: int, rows: int, **spacing: list[float]) -> Dataset:
    ds = Dataset()
    ds.Columns, ds.Rows = cols, rows
    for keyword, value in spacing.items():
        setattr(ds, keyword, value)
    return ds


def test_warnings_group_images_and_read_either_spacing() -> None:
    card = load_card(CARD)
    images = [
        ("a.dcm", _image(832, 1024, PixelSpacing=[0.28, 0.28])),
        ("b.dcm", _image(832, 1024, ImagerPixelSpacing=[0.02, 0.02])),
        ("c.dcm", _image(832, 1024, ImagerPixelSpacing=[0.02, 0.02])),
    ]
    lines = geometry_warnings(card, images)
    assert len(lines) == 1 and lines[0].startswith("b.dcm and 1 more: 832x1024 at 0.02 mm")
    assert "cnn3-phantom v2" in lines[0]
    no_geometry = card.model_copy(update={"trained_geometry": None})
    assert geometry_warnings(no_geometry, images) == []
