"""C-FIND and C-GET identifiers (PS3.4 C.4.1, C.4.3) as index queries, matched as QIDO-RS is.

An identifier's elements with a value are matching keys, run through the same rules as QIDO-RS
query parameters (services/core/db/qido.py: UID lists, DA/TM ranges, ``*``/``?`` wildcards,
case-insensitive person names); a key crgate cannot match on, a value it cannot use, or a
sequence with items is an ``IdentifierError`` naming the element. Empty elements are return
keys: the indexed ones are answered with their values, the others zero-length.

Levels: PATIENT (Patient Root only), STUDY, SERIES, IMAGE. Matching is lenient about the
hierarchy: keys of the levels above may be any matching key, not only unique keys (as Orthanc
and dcm4chee accept). A C-GET needs its level's unique key (PatientID, StudyInstanceUID,
SeriesInstanceUID, SOPInstanceUID) with one or more values; it retrieves every instance under
the matches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import PersonName

from services.core.db.qido import (
    ATTRIBUTES,
    PER_LEVEL,
    Level,
    Query,
    available,
    match_values,
    matching_attribute,
)
from services.core.errors import InvalidParameter


class Model(StrEnum):
    """The Query/Retrieve information model of the presentation context."""

    PATIENT_ROOT = "Patient Root"
    STUDY_ROOT = "Study Root"


LEVELS = {
    "PATIENT": Level.PATIENT,
    "STUDY": Level.STUDY,
    "SERIES": Level.SERIES,
    "IMAGE": Level.INSTANCE,
}
UNIQUE_KEYS = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.INSTANCE: "SOPInstanceUID",
}
_ORDER = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.INSTANCE)
_LEVEL_TAG = Tag("QueryRetrieveLevel")
_CHARSET_TAG = Tag("SpecificCharacterSet")
_RETRIEVE_AE_TAG = Tag("RetrieveAETitle")
UTF8 = "ISO_IR 192"


class IdentifierError(InvalidParameter):
    """An identifier crgate cannot answer; ``tags`` are the offending elements."""

    def __init__(self, message: str, tags: list[BaseTag] | None = None) -> None:
        super().__init__(message)
        self.tags = tags or []


@dataclass
class FindRequest:
    """A C-FIND identifier, parsed: the query, and how to shape each response."""

    query: Query
    level_name: str  # as the identifier spelled it: PATIENT, STUDY, SERIES, IMAGE
    retrieve_ae: bool = False  # Retrieve AE Title asked for
    unanswered: list[DataElement] = field(default_factory=list)  # returned zero-length


def find_request(identifier: Dataset, model: Model) -> FindRequest:
    """The query for a C-FIND identifier; IdentifierError when it cannot be answered."""
    name, level = _level(identifier, model)
    request = FindRequest(query=Query(level=level), level_name=name)
    matching: list[tuple[DataElement, str]] = []
    for element in identifier:
        if element.tag in (_LEVEL_TAG, _CHARSET_TAG):
            continue
        if element.tag == _RETRIEVE_AE_TAG:
            request.retrieve_ae = True
            continue
        text = _text(element)
        if text:
            matching.append((element, text))
            continue
        attr = ATTRIBUTES.get(element.keyword)
        if element.keyword in PER_LEVEL or (attr is not None and available(attr, level)):
            request.query.fields.add(element.keyword)
        elif not element.tag.is_private:
            request.unanswered.append(DataElement(element.tag, element.VR, None))
    _add_matching(request.query, matching)
    request.query.fields |= {UNIQUE_KEYS[lv] for lv in _hierarchy(model, level)}
    return request


def get_query(identifier: Dataset, model: Model) -> Query:
    """The query whose matches a C-GET retrieves; IdentifierError when it cannot be answered."""
    _, level = _level(identifier, model)
    key = UNIQUE_KEYS[level]
    if key not in identifier or not _text(identifier[key]):
        raise IdentifierError(
            f"a {level.value}-level retrieve needs {key} with one or more values",
            [Tag(key)],
        )
    query = Query(level=level)
    matching = [
        (e, t)
        for e in identifier
        if e.tag not in (_LEVEL_TAG, _CHARSET_TAG, _RETRIEVE_AE_TAG) and (t := _text(e))
    ]
    _add_matching(query, matching)
    return query


def response(request: FindRequest, match: Dataset, *, ae_title: str) -> Dataset:
    """A pending C-FIND response identifier for one match."""
    match.QueryRetrieveLevel = request.level_name
    if request.retrieve_ae:
        match.RetrieveAETitle = ae_title
    for element in request.unanswered:
        if element.tag not in match:
            match.add(DataElement(element.tag, element.VR, None))
    if not all(_ascii(element.value) for element in match):
        match.SpecificCharacterSet = UTF8
    return match


# -- internals -----------------------------------------------------------------------------------


def _level(identifier: Dataset, model: Model) -> tuple[str, Level]:
    name = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if name not in LEVELS:
        raise IdentifierError(
            f"Query/Retrieve Level {name!r} is not PATIENT, STUDY, SERIES or IMAGE"
            if name
            else "the identifier has no Query/Retrieve Level (0008,0052)",
            [_LEVEL_TAG],
        )
    if model is Model.STUDY_ROOT and name == "PATIENT":
        raise IdentifierError(
            "the Study Root model has no PATIENT level; use Patient Root", [_LEVEL_TAG]
        )
    return name, LEVELS[name]


def _hierarchy(model: Model, level: Level) -> list[Level]:
    top = Level.PATIENT if model is Model.PATIENT_ROOT else Level.STUDY
    return [lv for lv in _ORDER if _ORDER.index(top) <= _ORDER.index(lv) <= _ORDER.index(level)]


def _add_matching(query: Query, matching: list[tuple[DataElement, str]]) -> None:
    for element, text in matching:
        if element.VR == "SQ":
            raise IdentifierError(
                f"{element.keyword or element.tag}: matching on sequence attributes is not "
                "supported",
                [element.tag],
            )
        if element.tag.is_private or not element.keyword:
            raise IdentifierError(f"{element.tag}: cannot match on private attributes")
        try:
            attr = matching_attribute(element.keyword, query.level)
            values = match_values(attr, [text])
        except InvalidParameter as exc:
            message = _without_patient_data(str(exc), element, text)
            raise IdentifierError(message, [element.tag]) from None
        query.fields.add(attr.keyword)
        if values:
            query.filters.append((attr, values))


def _without_patient_data(message: str, element: DataElement, text: str) -> str:
    """``message`` with the value of a patient attribute blanked out: errors are logged and sent
    back, and neither carries a patient's name, ID or birth date."""
    if not element.keyword.startswith("Patient"):
        return message
    for piece in sorted(re.split(r"[-\\,]", text), key=len, reverse=True):
        if piece:
            message = message.replace(piece, "...")
    return message


def _text(element: DataElement) -> str:
    """The element's value as QIDO-RS text ('' when empty; multiple values joined by ``\\``);
    a sequence counts as a value when one of its items has a non-empty element."""
    value: Any = element.value
    if element.VR == "SQ":
        return "(sequence)" if any(_text(e) for item in value or [] for e in item) else ""
    if value is None:
        return ""
    if isinstance(value, (list, MultiValue)):
        return "\\".join(str(v) for v in value).strip()
    if isinstance(value, bytes):
        return "(bytes)" if value.strip(b"\x00 ") else ""
    return str(value).strip()


def _ascii(value: Any) -> bool:
    if isinstance(value, (list, MultiValue)):
        return all(_ascii(v) for v in value)
    return not isinstance(value, (str, PersonName)) or str(value).isascii()
