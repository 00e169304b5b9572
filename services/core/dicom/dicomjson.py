"""DICOM JSON model (PS3.18 F.2) from pydicom datasets: QIDO-RS results, WADO-RS metadata and
STOW-RS store responses."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pydicom.config import IGNORE
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

JsonDict = dict[str, Any]

BULK_THRESHOLD = 1024  # bytes: larger binary values become BulkDataURI


def dataset(attributes: Mapping[str, Sequence[Any]]) -> Dataset:
    """A dataset from keyword -> values (``[]`` for an empty attribute, datasets for a sequence).

    VRs come from the DICOM dictionary. Values are not checked against their VR (an Error
    Comment may exceed the 64 characters of LO), as these datasets are only sent as JSON.
    """
    ds = Dataset()
    tags = sorted((int(Tag(keyword)), keyword) for keyword in attributes)
    for tag, keyword in tags:
        ds.add(
            DataElement(tag, dictionary_VR(tag), list(attributes[keyword]), validation_mode=IGNORE)
        )
    return ds


def to_dicom_json(
    ds: Dataset,
    *,
    bulk_uri: Callable[[str], str] | None = None,
    keywords: Iterable[str] | None = None,
) -> JsonDict:
    """``ds`` as a DICOM JSON object.

    ``bulk_uri(tag_hex)`` turns large binary values (Pixel Data and other OB/OW/UN values above
    ``BULK_THRESHOLD``) into ``BulkDataURI`` references; without it they are left out, as QIDO
    responses do. ``keywords`` keeps only those attributes.
    """
    if keywords is not None:
        wanted = {int(Tag(k)) for k in keywords}
        subset = Dataset()
        for tag in wanted:
            if tag in ds:
                subset.add(ds[tag])
        ds = subset

    def bulk(element: DataElement) -> str:
        if bulk_uri is None:
            return ""
        return bulk_uri(f"{int(element.tag):08X}")

    result: JsonDict = ds.to_json_dict(BULK_THRESHOLD, bulk)
    if bulk_uri is None:
        result = {
            tag: value
            for tag, value in result.items()
            if not (isinstance(value, dict) and value.get("BulkDataURI") == "")
        }
    return result
