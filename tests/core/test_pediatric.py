"""Whether a study's patient is pediatric, from the mammogram's header (policy matching)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from services.core.classify import is_pediatric


def header(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the malformed values, on purpose
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"PatientAge": "012Y"}, True),
        ({"PatientAge": "017Y"}, True),
        ({"PatientAge": "018Y"}, False),
        ({"PatientAge": "045Y"}, False),
        ({"PatientAge": "030M"}, True),
        ({"PatientAge": "010W"}, True),
        ({"PatientAge": "200D"}, True),
        # Patient's Age wins over the dates
        ({"PatientAge": "052Y", "PatientBirthDate": "20100101", "StudyDate": "20200101"}, False),
        # no (or a malformed) age: from the birth date to the study date
        ({"PatientBirthDate": "20100102", "StudyDate": "20280101"}, True),  # a day short of 18
        ({"PatientBirthDate": "20100101", "StudyDate": "20280101"}, False),
        ({"PatientAge": "12", "PatientBirthDate": "19700101", "StudyDate": "20200101"}, False),
        ({"PatientAge": "", "PatientBirthDate": "20150601", "StudyDate": "20200101"}, True),
        # unknown: no age, a date missing, partial or after the study
        ({}, None),
        ({"PatientAge": "YYYY"}, None),
        ({"PatientBirthDate": "20100101"}, None),
        ({"PatientBirthDate": "2010", "StudyDate": "20200101"}, None),
        ({"PatientBirthDate": "20250101", "StudyDate": "20200101"}, None),
    ],
)
def test_pediatric_from_age_else_dates(values: dict[str, str], expected: bool | None) -> None:
    assert is_pediatric(header(**values)) is expected
