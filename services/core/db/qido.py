"""Searches of the index (QIDO-RS, PS3.18 10.6, and C-FIND, PS3.4 C.4.1; matching per PS3.4
C.2.2.2): one query implementation for both.

``parse_query`` turns QIDO-RS query parameters into a ``Query`` (InvalidParameter naming the
attribute when a key or value cannot be used); ``search`` runs it as one SQL query on SQLite or
PostgreSQL (plus grouped counts for the page) and returns DICOM JSON objects. C-FIND identifiers
become the same ``Query`` (services/core/db/identifier.py) and run through ``iter_matches``
(every match, page by page, as datasets); C-GET finds its instances with ``matching_instances``.
The PATIENT level (C-FIND only) lists the distinct patients of the studies table.

Matching, as implemented:
- UIDs: single value or list (``,`` or ``\\`` separated, or the key repeated); exact.
- Dates (DA): ``YYYYMMDD``, ``YYYYMMDD-``, ``-YYYYMMDD``, ``A-B`` (inclusive).
  Times (TM): ``HH[MM[SS[.F]]]`` and ranges; a value matches its whole precision
  (``1450`` matches 14:50:00 to 14:50:59.999999).
- Text: exact and case-sensitive, ``*`` and ``?`` wildcards. Person names (PN) are matched
  case-insensitively on the whole stored value (``Doe^Jane``), as Orthanc does by default; on
  SQLite case folding covers ASCII letters only.
- Modality, ModalitiesInStudy: one code or a list (a study matches if any series has one).
- An empty value or a lone ``*`` matches everything (the attribute is returned).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import Enum, StrEnum, auto
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, Select, and_, exists, func, select, true
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased, sessionmaker

from services.core.db.tables import Instance, Series, Study
from services.core.dicom.dicomjson import JsonDict, dataset, to_dicom_json
from services.core.dicom.uids import validate_uid
from services.core.errors import InvalidParameter, InvalidUID
from services.core.params import check_text, parse_count

MAX_RESULTS = 1000  # per response; more results carry a warning and need offset


class Level(StrEnum):
    PATIENT = "patient"  # C-FIND's Patient Root model; QIDO-RS has no patient resource
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


_RANK = {Level.PATIENT: -1, Level.STUDY: 0, Level.SERIES: 1, Level.INSTANCE: 2}
#: the patient attributes (columns of the studies table), the PATIENT level's matching keys
PATIENT_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")


class Kind(Enum):
    UID = auto()
    DATE = auto()
    TIME = auto()
    TEXT = auto()
    PN = auto()
    CODES = auto()  # CS, one value or a list
    INT = auto()
    MODALITIES = auto()  # ModalitiesInStudy: matched through the series
    COMPUTED = auto()  # return key only


@dataclass(frozen=True)
class Attribute:
    keyword: str
    level: Level
    kind: Kind
    column: InstrumentedAttribute[Any] | None = None
    default: bool = True  # returned without includefield

    @property
    def tag(self) -> int:
        tag = tag_for_keyword(self.keyword)
        assert tag is not None, self.keyword
        return tag

    @property
    def vr(self) -> str:
        return str(dictionary_VR(self.tag))

    @property
    def matchable(self) -> bool:
        return self.kind is not Kind.COMPUTED


_P, _S, _R, _I = Level.PATIENT, Level.STUDY, Level.SERIES, Level.INSTANCE
ATTRIBUTES: dict[str, Attribute] = {
    a.keyword: a
    for a in (
        Attribute("NumberOfPatientRelatedStudies", _P, Kind.COMPUTED, default=False),
        Attribute("NumberOfPatientRelatedSeries", _P, Kind.COMPUTED, default=False),
        Attribute("NumberOfPatientRelatedInstances", _P, Kind.COMPUTED, default=False),
        Attribute("StudyDate", _S, Kind.DATE, Study.study_date),
        Attribute("StudyTime", _S, Kind.TIME, Study.study_time),
        Attribute("AccessionNumber", _S, Kind.TEXT, Study.accession_number),
        Attribute("ModalitiesInStudy", _S, Kind.MODALITIES),
        Attribute("ReferringPhysicianName", _S, Kind.PN, Study.referring_physician_name),
        Attribute("PatientName", _S, Kind.PN, Study.patient_name),
        Attribute("PatientID", _S, Kind.TEXT, Study.patient_id),
        Attribute("PatientBirthDate", _S, Kind.DATE, Study.patient_birth_date),
        Attribute("PatientSex", _S, Kind.TEXT, Study.patient_sex),
        Attribute("StudyInstanceUID", _S, Kind.UID, Study.study_uid),
        Attribute("StudyID", _S, Kind.TEXT, Study.study_id),
        Attribute("StudyDescription", _S, Kind.TEXT, Study.study_description, default=False),
        Attribute("NumberOfStudyRelatedSeries", _S, Kind.COMPUTED),
        Attribute("NumberOfStudyRelatedInstances", _S, Kind.COMPUTED),
        Attribute("Modality", _R, Kind.CODES, Series.modality),
        Attribute("SeriesDescription", _R, Kind.TEXT, Series.series_description),
        Attribute("SeriesNumber", _R, Kind.INT, Series.series_number),
        Attribute("SeriesInstanceUID", _R, Kind.UID, Series.series_uid),
        Attribute("BodyPartExamined", _R, Kind.TEXT, Series.body_part_examined, default=False),
        Attribute("NumberOfSeriesRelatedInstances", _R, Kind.COMPUTED),
        Attribute("SOPClassUID", _I, Kind.UID, Instance.sop_class_uid),
        Attribute("SOPInstanceUID", _I, Kind.UID, Instance.sop_instance_uid),
        Attribute("InstanceNumber", _I, Kind.INT, Instance.instance_number),
        Attribute("Rows", _I, Kind.INT, Instance.rows),
        Attribute("Columns", _I, Kind.INT, Instance.columns),
        Attribute("BitsAllocated", _I, Kind.INT, Instance.bits_allocated),
        Attribute("NumberOfFrames", _I, Kind.INT, Instance.number_of_frames),
        Attribute(
            "AvailableTransferSyntaxUID",
            _I,
            Kind.UID,
            Instance.transfer_syntax_uid,
            default=False,
        ),
    )
}
# returned at every level, describing the result's own level; never matching keys
PER_LEVEL = ("InstanceAvailability", "RetrieveURL")
_PARENT_UIDS = {
    Level.PATIENT: ("PatientID",),
    Level.STUDY: ("StudyInstanceUID",),
    Level.SERIES: ("StudyInstanceUID", "SeriesInstanceUID"),
    Level.INSTANCE: ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}
_CONTROL = ("limit", "offset", "fuzzymatching", "includefield")
_TAG_RE = re.compile(r"^[0-9A-Fa-f]{8}$")
_LIST_SPLIT = re.compile(r"[,\\]")
_TIME_RE = re.compile(r"^([01][0-9]|2[0-3])(([0-5][0-9])(([0-5][0-9]|60)(\.[0-9]{1,6})?)?)?$")


@dataclass
class Query:
    level: Level
    study_uid: str | None = None  # from the path: /studies/{study}/...
    series_uid: str | None = None  # from the path: .../series/{series}/instances
    filters: list[tuple[Attribute, list[str]]] = field(default_factory=list)
    fields: set[str] = field(default_factory=set)  # keywords to return
    limit: int | None = None
    offset: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SearchResult:
    items: list[JsonDict]
    warnings: list[str]


# -- parsing --------------------------------------------------------------------------------------


def parse_query(
    level: Level,
    params: Sequence[tuple[str, str]],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> Query:
    """A ``Query`` from QIDO-RS query parameters (in order; a key may repeat)."""
    query = Query(level=level)
    if study_uid is not None:
        query.study_uid = validate_uid(study_uid, "Study Instance UID in the path")
    if series_uid is not None:
        query.series_uid = validate_uid(series_uid, "Series Instance UID in the path")
    values: dict[str, list[str]] = {}
    include: list[str] = []
    seen_control: set[str] = set()
    for raw_key, raw_value in params:
        key = check_text(raw_key, f"query parameter name {raw_key[:64]!r}").strip()
        value = check_text(raw_value, f"query parameter {key}").strip()
        control = key.lower()
        if control in _CONTROL:
            if control == "includefield":
                include.extend(v.strip() for v in value.split(",") if v.strip())
                continue
            if control in seen_control:
                raise InvalidParameter(f"query parameter {control!r} is given more than once")
            seen_control.add(control)
            _control(query, control, value)
            continue
        attr = matching_attribute(key, level)
        values.setdefault(attr.keyword, []).append(value)
    for keyword, given in values.items():
        attr = ATTRIBUTES[keyword]
        if len(given) > 1 and attr.kind not in (Kind.UID, Kind.CODES, Kind.MODALITIES):
            raise InvalidParameter(
                f"matching key {keyword} is given more than once; it takes a single value"
            )
        parts = match_values(attr, given)
        query.fields.add(keyword)
        if parts:
            query.filters.append((attr, parts))
    query.fields |= _default_fields(query)
    query.fields |= _included(query, include)
    return query


def _control(query: Query, name: str, value: str) -> None:
    if name == "fuzzymatching":
        if value.lower() not in ("true", "false"):
            raise InvalidParameter(f"fuzzymatching must be 'true' or 'false', not {value!r}")
        if value.lower() == "true":
            query.warnings.append(
                "The fuzzymatching parameter is not supported. "
                "Only literal matching has been performed."
            )
        return
    number = parse_count(value, name)
    if name == "limit":
        if number == 0:
            raise InvalidParameter("limit must be at least 1 (leave it out for no limit)")
        query.limit = number
    else:
        query.offset = number


def _resolve(key: str) -> str:
    """The keyword of ``key`` (a keyword or 8 hex digits); InvalidParameter if not DICOM."""
    if "." in key:
        raise InvalidParameter(
            f"query key {key!r}: matching on sequence attributes is not supported"
        )
    if _TAG_RE.match(key):
        keyword = keyword_for_tag(int(key, 16))
        if not keyword:
            raise InvalidParameter(f"query key {key!r} is not a known DICOM attribute tag")
        return keyword
    if tag_for_keyword(key) is None:
        raise InvalidParameter(
            f"query key {key!r} is neither a DICOM keyword (e.g. PatientID) nor a tag "
            "(e.g. 00100020), nor one of limit, offset, fuzzymatching, includefield"
        )
    return key


def available(attr: Attribute, level: Level) -> bool:
    """Whether ``attr`` describes results of ``level`` (its own level or one above)."""
    if level is Level.PATIENT:
        return attr.level is Level.PATIENT or attr.keyword in PATIENT_KEYS
    return _RANK[attr.level] <= _RANK[level]


def matching_attribute(key: str, level: Level) -> Attribute:
    """The attribute a matching key names (keyword or tag); InvalidParameter if none here."""
    keyword = _resolve(key)
    attr = ATTRIBUTES.get(keyword)
    if attr is None or not attr.matchable:
        usable = ", ".join(k for k, a in ATTRIBUTES.items() if a.matchable and available(a, level))
        raise InvalidParameter(
            f"{keyword} cannot be used as a matching key here; the {level.value}-level "
            f"matching keys are: {usable}"
        )
    if not available(attr, level):
        raise InvalidParameter(
            f"{keyword} is a {attr.level.value}-level attribute and cannot be matched in a "
            f"{level.value}-level search; search {attr.level.value} resources instead"
        )
    return attr


def match_values(attr: Attribute, given: list[str]) -> list[str]:
    """The values to match (empty: universal matching), checked for the attribute's kind."""
    name = attr.keyword
    if attr.kind in (Kind.UID, Kind.CODES, Kind.MODALITIES):
        items = [v.strip() for g in given for v in _LIST_SPLIT.split(g) if v.strip()]
        if attr.kind is Kind.UID:
            for uid in items:
                try:
                    validate_uid(uid, name)
                except InvalidUID as exc:
                    raise InvalidParameter(str(exc)) from None
        elif len(items) > 1 and any(c in v for v in items for c in "*?"):
            raise InvalidParameter(f"{name}: wildcards cannot be combined with a list of values")
        return [] if items in ([], ["*"]) else items
    value = given[0]
    if value in ("", "*"):
        return []
    if attr.kind is Kind.DATE:
        _date_range(name, value)
    elif attr.kind is Kind.TIME:
        _time_range(name, value)
    elif attr.kind is Kind.INT and not (
        re.fullmatch(r"[+-]?[0-9]{1,10}", value) and -(2**31) <= int(value) < 2**31
    ):
        raise InvalidParameter(
            f"{name} must be an integer from {-(2**31)} to {2**31 - 1} (VR IS), not {value!r}"
        )
    return [value]


def _date_range(name: str, value: str) -> tuple[str | None, str | None]:
    low, dash, high = value.partition("-")
    if not dash:
        high = low
    if not low and not high:
        raise InvalidParameter(f"{name}: a range needs at least one date (YYYYMMDD-YYYYMMDD)")
    for part in (low, high):
        if part:
            _check_date(name, part)
    if low and high and low > high:
        raise InvalidParameter(f"{name}: the range {value!r} starts after it ends")
    return low or None, high or None


def _check_date(name: str, value: str) -> None:
    try:
        if not re.fullmatch(r"[0-9]{8}", value):
            raise ValueError
        date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        raise InvalidParameter(
            f"{name}: {value!r} is not a date; use YYYYMMDD, or a range such as "
            "20240101-20241231, 20240101- or -20241231"
        ) from None


def _time_range(name: str, value: str) -> tuple[str | None, str | None]:
    low, dash, high = value.partition("-")
    if not dash:
        high = low
    if not low and not high:
        raise InvalidParameter(f"{name}: a range needs at least one time (HHMMSS-HHMMSS)")
    for part in (low, high):
        if part and not _TIME_RE.match(part):
            raise InvalidParameter(
                f"{name}: {part!r} is not a time; use HH, HHMM, HHMMSS or HHMMSS.FFFFFF, "
                "or a range such as 0800-1200"
            )
    return low or None, (_time_ceiling(high) if high else None)


def _time_ceiling(value: str) -> str:
    """The last moment a time of this precision covers, as a comparable string."""
    if len(value) == 2:
        return value + "5959.999999"
    if len(value) == 4:
        return value + "59.999999"
    if len(value) == 6:
        return value + ".999999"
    head, _, fraction = value.partition(".")
    return f"{head}.{fraction.ljust(6, '9')}"


def _default_fields(query: Query) -> set[str]:
    wanted: set[str] = set(PER_LEVEL) | set(_PARENT_UIDS[query.level])
    # a search names the parent's attributes only when it is not scoped to that parent
    levels = {query.level}
    if query.level is Level.SERIES and query.study_uid is None:
        levels.add(Level.STUDY)
    if query.level is Level.INSTANCE:
        if query.series_uid is None:
            levels.add(Level.SERIES)
        if query.study_uid is None:
            levels.add(Level.STUDY)
    wanted |= {k for k, a in ATTRIBUTES.items() if a.default and a.level in levels}
    return wanted


def _included(query: Query, names: Iterable[str]) -> set[str]:
    wanted: set[str] = set()
    for name in names:
        if name.lower() == "all":
            wanted |= {
                k
                for k, a in ATTRIBUTES.items()
                if available(a, query.level) and a.level is not Level.PATIENT
            }
            continue
        try:
            keyword = _resolve(name)
        except InvalidParameter as exc:
            raise InvalidParameter(f"includefield: {exc}") from None
        attr = ATTRIBUTES.get(keyword)
        if keyword in PER_LEVEL:
            continue
        if attr is None or not available(attr, query.level):
            query.warnings.append(
                f"includefield {keyword} is not available in {query.level.value}-level "
                "results and was ignored"
            )
            continue
        wanted.add(keyword)
    return wanted


# -- SQL ------------------------------------------------------------------------------------------


def search(session: Session, query: Query, *, retrieve_root: str) -> SearchResult:
    """Run ``query``; ``retrieve_root`` is the DICOMweb base URL for RetrieveURL values."""
    cap = min(query.limit or MAX_RESULTS, MAX_RESULTS)
    rows = _rows(session, query, limit=cap + 1, offset=query.offset)
    warnings = list(query.warnings)
    if len(rows) > cap:
        rows = rows[:cap]
        if query.limit is None or query.limit > MAX_RESULTS:
            warnings.append(
                f"There are additional results that can be requested (at most {MAX_RESULTS} "
                "per response; use offset)"
            )
    extra = _computed(session, query, rows)
    items = [to_dicom_json(_to_dataset(query, row, extra, retrieve_root)) for row in rows]
    return SearchResult(items=items, warnings=warnings)


def iter_matches(
    sessions: sessionmaker[Session], query: Query, *, page: int = MAX_RESULTS
) -> Iterator[Dataset]:
    """Every match of ``query`` as a dataset of its fields, read ``page`` rows at a time (one
    short session per page, none open while the caller handles a result)."""
    offset = query.offset
    while True:
        with sessions() as session:
            rows = _rows(session, query, limit=page, offset=offset)
            extra = _computed(session, query, rows)
            found = [_to_dataset(query, row, extra, None) for row in rows]
        yield from found
        if len(rows) < page:
            return
        offset += page


def matching_instances(session: Session, query: Query) -> list[Instance]:
    """The instances under every match of ``query`` (at any level), in search order."""
    statement = _filtered(_base_select(Level.INSTANCE), query, session)
    rows = session.execute(statement.order_by(*_ordering(Level.INSTANCE))).all()
    return [row[2] for row in rows]


def _filtered(
    statement: Select[*tuple[Any, ...]], query: Query, session: Session
) -> Select[*tuple[Any, ...]]:
    dialect = session.get_bind().dialect.name
    if query.study_uid is not None:
        statement = statement.where(Study.study_uid == query.study_uid)
    if query.series_uid is not None:
        statement = statement.where(Series.series_uid == query.series_uid)
    for attr, values in query.filters:
        statement = statement.where(_condition(attr, values, dialect))
    return statement


def _rows(session: Session, query: Query, *, limit: int, offset: int) -> list[_Row]:
    statement = _filtered(_base_select(query.level), query, session)
    statement = statement.order_by(*_ordering(query.level)).limit(limit).offset(offset)
    rows = session.execute(statement).all()
    if query.level is Level.PATIENT:
        return [_Row(PatientRow(*row)) for row in rows]
    if query.level is Level.STUDY:
        return [_Row(row[0]) for row in rows]
    return [_Row(*row) for row in rows]


def _base_select(level: Level) -> Select[*tuple[Any, ...]]:
    if level is Level.PATIENT:
        return select(*_PATIENT_COLUMNS).distinct()
    if level is Level.STUDY:
        return select(Study)
    if level is Level.SERIES:
        return select(Study, Series).join(Series, Series.study_uid == Study.study_uid)
    return (
        select(Study, Series, Instance)
        .join(Series, Series.study_uid == Study.study_uid)
        .join(Instance, Instance.series_uid == Series.series_uid)
    )


def _ordering(level: Level) -> list[ColumnElement[Any]]:
    if level is Level.PATIENT:
        return [column.asc().nulls_first() for column in _PATIENT_COLUMNS]
    order: list[ColumnElement[Any]] = [
        Study.study_date.desc().nulls_last(),
        Study.study_time.desc().nulls_last(),
        Study.study_uid.asc(),
    ]
    if level is not Level.STUDY:
        order += [Series.series_number.asc().nulls_last(), Series.series_uid.asc()]
    if level is Level.INSTANCE:
        order += [Instance.instance_number.asc().nulls_last(), Instance.sop_instance_uid.asc()]
    return order


def _condition(attr: Attribute, values: list[str], dialect: str) -> ColumnElement[bool]:
    if attr.kind is Kind.MODALITIES:
        other = aliased(Series)
        return exists(
            select(other.series_uid).where(
                other.study_uid == Study.study_uid, other.modality.in_(values)
            )
        )
    column = attr.column
    assert column is not None
    condition: ColumnElement[bool]
    if attr.kind is Kind.UID:
        condition = column.in_(values)
        return condition
    value = values[0]
    if attr.kind is Kind.CODES:
        if len(values) == 1 and _has_wildcard(value):
            return _wildcard(column, value, dialect)
        condition = column.in_(values)
        return condition
    if attr.kind is Kind.INT:
        condition = column == int(value)
        return condition
    if attr.kind is Kind.DATE:
        low, high = _date_range(attr.keyword, value)
        return _between(column, low, high)
    if attr.kind is Kind.TIME:
        low, high = _time_range(attr.keyword, value)
        return _between(column, low, high)
    if attr.kind is Kind.PN:
        folded = func.lower(column)
        if _has_wildcard(value):
            return folded.like(_like_pattern(value.lower()), escape="!")
        return folded == value.lower()
    if _has_wildcard(value):
        return _wildcard(column, value, dialect)
    condition = column == value
    return condition


def _between(
    column: InstrumentedAttribute[Any], low: str | None, high: str | None
) -> ColumnElement[bool]:
    parts: list[ColumnElement[bool]] = []
    if low is not None:
        parts.append(column >= low)
    if high is not None:
        parts.append(column <= high)
    return and_(true(), *parts)


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _wildcard(column: InstrumentedAttribute[Any], value: str, dialect: str) -> ColumnElement[bool]:
    """Case-sensitive ``*``/``?`` matching: GLOB on SQLite (its LIKE ignores case), else LIKE."""
    if dialect == "sqlite":
        glob: ColumnElement[bool] = column.op("GLOB")(value.replace("[", "[[]"))
        return glob
    return column.like(_like_pattern(value), escape="!")


def _like_pattern(value: str) -> str:
    escaped = value.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return escaped.replace("*", "%").replace("?", "_")


# -- results --------------------------------------------------------------------------------------


_PATIENT_COLUMNS = (
    Study.patient_id,
    Study.patient_name,
    Study.patient_birth_date,
    Study.patient_sex,
)


@dataclass(frozen=True)
class PatientRow:
    """A PATIENT-level match: the patient attributes of one or more studies."""

    patient_id: str | None
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None


@dataclass(frozen=True)
class _Row:
    study: Study | PatientRow
    series: Series | None = None
    instance: Instance | None = None


@dataclass
class _Computed:
    studies_of_patient: dict[str, int] = field(default_factory=dict)
    series_of_patient: dict[str, int] = field(default_factory=dict)
    instances_of_patient: dict[str, int] = field(default_factory=dict)
    series_in_study: dict[str, int] = field(default_factory=dict)
    instances_in_study: dict[str, int] = field(default_factory=dict)
    modalities: dict[str, list[str]] = field(default_factory=dict)
    instances_in_series: dict[str, int] = field(default_factory=dict)


def _computed(session: Session, query: Query, rows: list[_Row]) -> _Computed:
    """Counts and modalities for the studies and series on this page only."""
    out = _Computed()
    patients = sorted({r.study.patient_id for r in rows if r.study.patient_id is not None})
    if patients and "NumberOfPatientRelatedStudies" in query.fields:
        out.studies_of_patient = _counts(session, Study.patient_id, patients)
    if patients and "NumberOfPatientRelatedSeries" in query.fields:
        out.series_of_patient = _counts(
            session, Study.patient_id, patients, join=(Series, Series.study_uid)
        )
    if patients and "NumberOfPatientRelatedInstances" in query.fields:
        out.instances_of_patient = _counts(
            session, Study.patient_id, patients, join=(Instance, Instance.study_uid)
        )
    studies = sorted({r.study.study_uid for r in rows if isinstance(r.study, Study)})
    series = sorted({r.series.series_uid for r in rows if r.series is not None})
    if studies and "NumberOfStudyRelatedSeries" in query.fields:
        out.series_in_study = _counts(session, Series.study_uid, studies)
    if studies and "NumberOfStudyRelatedInstances" in query.fields:
        out.instances_in_study = _counts(session, Instance.study_uid, studies)
    if studies and "ModalitiesInStudy" in query.fields:
        pairs = session.execute(
            select(Series.study_uid, Series.modality)
            .where(Series.study_uid.in_(studies), Series.modality.is_not(None))
            .distinct()
            .order_by(Series.study_uid, Series.modality)
        ).all()
        for study_uid, modality in pairs:
            out.modalities.setdefault(study_uid, []).append(str(modality))
    if series and "NumberOfSeriesRelatedInstances" in query.fields:
        out.instances_in_series = _counts(session, Instance.series_uid, series)
    return out


def _counts(
    session: Session,
    column: InstrumentedAttribute[str] | InstrumentedAttribute[str | None],
    keys: list[str],
    *,
    join: tuple[type[Series] | type[Instance], InstrumentedAttribute[str]] | None = None,
) -> dict[str, int]:
    """Rows per key; with ``join``, rows of that table per key of ``column``'s study."""
    statement = select(column, func.count())
    if join is not None:
        table, study_uid = join
        statement = statement.select_from(table).join(Study, Study.study_uid == study_uid)
    result = session.execute(statement.where(column.in_(keys)).group_by(column)).all()
    return {str(key): int(count) for key, count in result}


def _retrieve_url(root: str, level: Level, row: _Row) -> str:
    assert isinstance(row.study, Study)
    url = f"{root}/studies/{row.study.study_uid}"
    if level is not Level.STUDY and row.series is not None:
        url += f"/series/{row.series.series_uid}"
    if level is Level.INSTANCE and row.instance is not None:
        url += f"/instances/{row.instance.sop_instance_uid}"
    return url


def _to_dataset(query: Query, row: _Row, extra: _Computed, root: str | None) -> Dataset:
    """The result's dataset: its fields (RetrieveURL only with a DICOMweb ``root``)."""
    study_uid = row.study.study_uid if isinstance(row.study, Study) else ""
    patient_id = row.study.patient_id or ""
    computed: dict[str, Any] = {
        "InstanceAvailability": ["ONLINE"],
        "RetrieveURL": [_retrieve_url(root, query.level, row)] if root is not None else [],
        "NumberOfPatientRelatedStudies": [extra.studies_of_patient.get(patient_id, 0)],
        "NumberOfPatientRelatedSeries": [extra.series_of_patient.get(patient_id, 0)],
        "NumberOfPatientRelatedInstances": [extra.instances_of_patient.get(patient_id, 0)],
        "ModalitiesInStudy": extra.modalities.get(study_uid, []),
        "NumberOfStudyRelatedSeries": [extra.series_in_study.get(study_uid, 0)],
        "NumberOfStudyRelatedInstances": [extra.instances_in_study.get(study_uid, 0)],
        "NumberOfSeriesRelatedInstances": [
            extra.instances_in_series.get(row.series.series_uid, 0) if row.series else 0
        ],
    }
    objects: dict[Level, Any] = {
        Level.STUDY: row.study,
        Level.SERIES: row.series,
        Level.INSTANCE: row.instance,
    }
    values: dict[str, list[Any]] = {}
    for keyword in query.fields:
        if keyword in computed:
            values[keyword] = computed[keyword]
        else:
            attr = ATTRIBUTES[keyword]
            assert attr.column is not None
            value = getattr(objects[attr.level], attr.column.key)
            values[keyword] = [] if value is None or value == "" else [value]
    return dataset(values)
