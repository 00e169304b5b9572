"""The console's study list: search the index, and say what arrived and what was done."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from services.core.db.tables import Instance, Job, Result, Series, Study

PAGE_SIZE = 25
OUTPUT_CHANNEL = "worker"  # crgate's own outputs (compressed copies, overlays, SR)


@dataclass(frozen=True)
class Search:
    """The search form; dates as YYYY-MM-DD (an HTML date input) or empty."""

    patient_id: str = ""
    date_from: str = ""
    date_to: str = ""
    modality: str = ""
    accession: str = ""
    page: int = 1


@dataclass
class StudyRow:
    uid: str
    patient_id: str
    date: str
    accession: str
    description: str
    modalities: list[str] = field(default_factory=list)
    series: int = 0
    instances: int = 0
    outputs: int = 0
    results: int = 0
    last_job: dict[str, Any] | None = None


def _like(text: str) -> str:
    """DICOM wildcards (* and ?) as SQL LIKE, other LIKE characters taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _dicom_date(value: str) -> str:
    return value.replace("-", "")[:8]


def search(session: Session, form: Search) -> tuple[list[StudyRow], int]:
    """One page of studies matching ``form``, newest first, and how many match in all."""
    query = select(Study)
    if form.patient_id:
        query = query.where(Study.patient_id.like(_like(form.patient_id), escape="\\"))
    if form.accession:
        query = query.where(Study.accession_number.like(_like(form.accession), escape="\\"))
    if form.date_from:
        query = query.where(Study.study_date >= _dicom_date(form.date_from))
    if form.date_to:
        query = query.where(Study.study_date <= _dicom_date(form.date_to))
    if form.modality:
        query = query.where(
            exists().where(Series.study_uid == Study.study_uid, Series.modality == form.modality)
        )
    total = int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
    studies = session.scalars(
        query.order_by(Study.study_date.desc(), Study.created_at.desc(), Study.study_uid)
        .limit(PAGE_SIZE)
        .offset((form.page - 1) * PAGE_SIZE)
    ).all()
    rows = {
        s.study_uid: StudyRow(
            uid=s.study_uid,
            patient_id=s.patient_id or "",
            date=_shown_date(s.study_date),
            accession=s.accession_number or "",
            description=s.study_description or "",
        )
        for s in studies
    }
    _add_counts(session, rows)
    return list(rows.values()), total


def _shown_date(value: str | None) -> str:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or ""


def _add_counts(session: Session, rows: dict[str, StudyRow]) -> None:
    uids = list(rows)
    if not uids:
        return
    series_counts = (
        select(Instance.study_uid, Instance.series_uid, Instance.channel, func.count())
        .where(Instance.study_uid.in_(uids))
        .group_by(Instance.study_uid, Instance.series_uid, Instance.channel)
    )
    modality = dict(session.execute(
        select(Series.series_uid, Series.modality).where(Series.study_uid.in_(uids))
    ).all())  # fmt: skip
    for study_uid, series_uid, channel, count in session.execute(series_counts):
        row = rows[study_uid]
        if channel == OUTPUT_CHANNEL:
            row.outputs += count
            continue
        row.instances += count
        row.series += 1
        name = modality.get(series_uid) or "?"
        if name not in row.modalities:
            row.modalities.append(name)
    results = select(Result.study_uid, func.count()).where(Result.study_uid.in_(uids))
    for study_uid, count in session.execute(results.group_by(Result.study_uid)):
        rows[study_uid].results = count
    jobs = session.scalars(
        select(Job).where(Job.study_uid.in_(uids)).order_by(Job.created_at.desc())
    )
    for job in jobs:
        row = rows[job.study_uid]
        if row.last_job is None:
            row.last_job = {"id": job.id, "kind": job.kind, "status": job.status,
                            "cr": job.cr, "reason": job.reason}  # fmt: skip


def modalities(session: Session) -> list[str]:
    """The modalities stored, for the search form's choice."""
    found = session.scalars(select(Series.modality).distinct().where(Series.modality.is_not(None)))
    return sorted(m for m in found if m)
