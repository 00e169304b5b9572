"""DICOM JSON model (PS3.18 F.2) from pydicom datasets, for QIDO-RS and WADO-RS metadata."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

JsonDict = dict[str, Any]

BULK_THRESHOLD = 1024  # bytes: larger binary values become BulkDataURI


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


def attribute(vr: str, *values: Any) -> JsonDict:
    """One DICOM JSON attribute; empty when no value is given."""
    if not values or values == (None,):
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": str(v)} for v in values]}
    return {"vr": vr, "Value": list(values)}
