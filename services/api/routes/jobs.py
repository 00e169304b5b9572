"""The job list: what was asked of crgate, newest first (one job is ``GET /jobs/{id}``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import func, select

from services.api.deps import SessionDep, require
from services.core.auth import Role
from services.core.classify import job_view
from services.core.contracts import JobStatus
from services.core.db.tables import Job
from services.core.errors import InvalidParameter

router = APIRouter(tags=["classification"])

MAX_LIMIT = 500


@router.get(
    "/jobs",
    summary="Jobs, newest first, by status and study",
    dependencies=[Depends(require(Role.VIEWER))],
)
def list_jobs(
    session: SessionDep,
    status: Annotated[str | None, Query(description="queued, running, succeeded or failed")] = None,
    study_uid: Annotated[str | None, Query(max_length=64, description="one study's jobs")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> dict[str, Any]:
    query = select(Job.id)
    count = select(func.count()).select_from(Job)
    if status:
        if status not in {s.value for s in JobStatus}:
            raise InvalidParameter(
                f"status {status[:40]!r}: use one of {', '.join(s.value for s in JobStatus)}"
            )
        query, count = query.where(Job.status == status), count.where(Job.status == status)
    if study_uid:
        query = query.where(Job.study_uid == study_uid)
        count = count.where(Job.study_uid == study_uid)
    ids = session.scalars(
        query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    ).all()
    return {
        "items": [job_view(session, job_id) for job_id in ids],
        "total": int(session.scalar(count) or 0),
        "limit": limit,
        "offset": offset,
    }
