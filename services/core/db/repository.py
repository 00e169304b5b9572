"""Keyword-only functions that read and write index rows (no business rules here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import Table, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.core.db.tables import Instance, Series, Study
from services.core.errors import InvalidInput

INT32 = range(-(2**31), 2**31)  # the Integer columns


@dataclass(frozen=True)
class IndexRow:
    """The study, series and instance values an instance's index row holds, built (and checked)
    before anything is written: a value the database would refuse is refused here."""

    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]


def index_row(ds: Dataset) -> IndexRow:
    """The index values of ``ds``; InvalidInput naming the attribute (never its value) when one
    cannot be read (an unknown VR) or holds a NUL character (PostgreSQL refuses it)."""
    return IndexRow(
        study=_checked(_study_values, ds),
        series=_checked(_series_values, ds),
        instance=_checked(_instance_values, ds),
    )


def _checked(build: Any, ds: Dataset) -> dict[str, Any]:
    values: dict[str, Any] = build(ds)
    for column, value in values.items():
        if isinstance(value, str) and "\x00" in value:
            raise InvalidInput(f"the value of {column} holds a NUL character; it cannot be indexed")
    return values


def upsert_instance(
    session: Session,
    *,
    row: IndexRow,
    transfer_syntax_uid: str,
    path: str,
    size_bytes: int,
    channel: str,
    source: str | None,
    replace: bool = False,
) -> None:
    """Insert the study and series rows if new, then the instance row (or update it on replace).

    Raises IntegrityError when the instance row exists and ``replace`` is false, or when the
    study's deletion committed meanwhile (the caller indexes again).
    """
    insert_ignore(session, Study.__table__, row.study)
    # the study's row before anything else (PostgreSQL): a deletion holding it (and its series)
    # finishes first, and no lock is taken in the other order; see deletion._hold
    study_uid = row.study["study_uid"]
    session.execute(
        select(Study.study_uid).where(Study.study_uid == study_uid).with_for_update(key_share=True)
    )
    insert_ignore(session, Series.__table__, row.series)
    values = dict(row.instance)
    values.update(
        transfer_syntax_uid=transfer_syntax_uid,
        path=path,
        size_bytes=size_bytes,
        channel=channel,
        source=(source or None) and source[:64],
    )
    if replace:
        session.execute(
            update(Instance)
            .where(Instance.sop_instance_uid == values["sop_instance_uid"])
            .values(
                **values,
                replaced_count=Instance.replaced_count + 1,
                received_at=func.now(),
            )
        )
    else:
        session.add(Instance(**values, replaced_count=0))
        session.flush()


def get_instance(session: Session, *, sop_instance_uid: str) -> Instance | None:
    return session.get(Instance, sop_instance_uid)


def instances_in(
    session: Session, *, study_uid: str, series_uid: str | None = None
) -> list[Instance]:
    """Instances of a study (or one of its series), ordered by series then instance number."""
    query = select(Instance).where(Instance.study_uid == study_uid)
    if series_uid is not None:
        query = query.where(Instance.series_uid == series_uid)
    query = query.order_by(Instance.series_uid, Instance.instance_number, Instance.sop_instance_uid)
    return list(session.scalars(query))


def insert_ignore(session: Session, table: Any, values: dict[str, Any]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING on SQLite and PostgreSQL (first writer wins)."""
    session.execute(_insert(session, table).values(**values).on_conflict_do_nothing())


def insert_or_update(
    session: Session,
    table: Any,
    values: dict[str, Any],
    *,
    key: list[str],
    changes: dict[str, Any],
) -> None:
    """INSERT ... ON CONFLICT (key) DO UPDATE SET changes, on SQLite and PostgreSQL: one
    atomic statement, safe when writers race for the same key. ``changes`` may use the table's
    columns (the row as it was), e.g. ``{"n": table.c.n + 1}``."""
    statement = _insert(session, table).values(**values)
    session.execute(statement.on_conflict_do_update(index_elements=key, set_=changes))


def _insert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    tbl: Table = table
    if dialect == "postgresql":
        return postgresql.insert(tbl)
    if dialect == "sqlite":
        return sqlite.insert(tbl)
    raise RuntimeError(f"unsupported database dialect {dialect}")  # pragma: no cover


def _get(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception as exc:  # pydicom raises many types on a malformed element
        raise InvalidInput(
            f"{keyword} cannot be read ({type(exc).__name__}: unknown VR or malformed value)"
        ) from None


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = _get(ds, keyword)
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list | tuple):  # not PersonName: it iterates its chars
        value = "\\".join(str(v) for v in value)
    return str(value)[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    """An integer value; None when absent, not an integer or beyond the column."""
    value = _get(ds, keyword)
    try:
        number = int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is None or number in INT32 else None


def _study_values(ds: Dataset) -> dict[str, Any]:
    return {
        "study_uid": str(ds.StudyInstanceUID),
        "patient_id": _text(ds, "PatientID", 64),
        "patient_name": _text(ds, "PatientName", 324),
        "patient_birth_date": _text(ds, "PatientBirthDate", 8),
        "patient_sex": _text(ds, "PatientSex", 16),
        "study_date": _text(ds, "StudyDate", 8),
        "study_time": _text(ds, "StudyTime", 16),
        "accession_number": _text(ds, "AccessionNumber", 16),
        "study_id": _text(ds, "StudyID", 16),
        "study_description": _text(ds, "StudyDescription", 64),
        "referring_physician_name": _text(ds, "ReferringPhysicianName", 324),
    }


def _series_values(ds: Dataset) -> dict[str, Any]:
    return {
        "series_uid": str(ds.SeriesInstanceUID),
        "study_uid": str(ds.StudyInstanceUID),
        "modality": _text(ds, "Modality", 16),
        "series_number": _int(ds, "SeriesNumber"),
        "series_description": _text(ds, "SeriesDescription", 64),
        "body_part_examined": _text(ds, "BodyPartExamined", 16),
    }


def _instance_values(ds: Dataset) -> dict[str, Any]:
    return {
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "series_uid": str(ds.SeriesInstanceUID),
        "study_uid": str(ds.StudyInstanceUID),
        "sop_class_uid": str(ds.SOPClassUID),
        "instance_number": _int(ds, "InstanceNumber"),
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "number_of_frames": _int(ds, "NumberOfFrames"),
        "bits_allocated": _int(ds, "BitsAllocated"),
    }
