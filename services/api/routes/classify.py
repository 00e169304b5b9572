"""Classification: start a job for a study, follow it, read its results and overlays."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from services.api.deps import SessionDep, StateDep, require
from services.core import classify, forwards, jobs
from services.core.auth import Principal, Role
from services.core.classify import job_view
from services.core.codecs import SYNTAX_HELP
from services.core.contracts import JobTrigger
from services.core.db.tables import Result
from services.core.dicom.uids import validate_uid
from services.core.errors import NotFound
from services.core.ratio import CompressionRatio

router = APIRouter(tags=["classification"])

UID_PATTERN = r"^[0-9.]{1,64}$"
StudyUID = Annotated[str, Path(description="Study Instance UID", pattern=UID_PATTERN)]
MAX_WAIT_S = 300.0
OverrideReason = Annotated[
    str | None,
    Query(
        max_length=1024,
        description="why the CR may exceed the ceiling of the study's policy: needed (with the "
        "admin role) above it, and audit-logged",
    ),
]
"""The ``reason=`` of an on-demand request above a ceiling (classify and compress)."""


@router.post(
    "/studies/{study_uid}/classify",
    status_code=202,
    summary="Classify a study at a compression ratio (the site's policy when cr is omitted)",
    dependencies=[Depends(require(Role.OPERATOR))],
)
async def post_classify(
    request: Request,
    state: StateDep,
    study_uid: StudyUID,
    cr: Annotated[
        float | None, Query(description="compression ratio; 1 = lossless; omit for the policy")
    ] = None,
    model: Annotated[str | None, Query(description="model name (default: the site's)")] = None,
    syntax: Annotated[str | None, Query(description=SYNTAX_HELP)] = None,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for the result")
    ] = 0,
    reason: OverrideReason = None,
    store: Annotated[
        bool,
        Query(
            description="store the outputs (compressed copies, overlays, SR) in the patient's "
            "study; false: the result JSON and overlay PNGs only (a research copy)"
        ),
    ] = True,
) -> JSONResponse:
    principal: Principal | None = getattr(request.state, "principal", None)
    validate_uid(study_uid, "Study Instance UID")
    job, _created = await run_in_threadpool(
        classify.request,
        state.job_context,
        state.queue,
        study_uid,
        cr=None if cr is None else CompressionRatio(cr),
        syntax=syntax,
        model=model,
        trigger=JobTrigger.API,
        requested_by=principal.name if principal else None,
        may_exceed_ceiling=principal is not None and principal.role is Role.ADMIN,
        reason=reason,
        store=store,
    )
    view = await wait_for(state, job.id, wait)
    body: dict[str, Any] = {"job": view, "status_url": f"/jobs/{job.id}"}
    if view["result_id"]:
        body["result"] = await run_in_threadpool(result_payload, state, view["result_id"])
        body["result_url"] = f"/studies/{study_uid}/results/{view['result_id']}"
        return JSONResponse(body, status_code=200)
    return JSONResponse(body, status_code=202, headers={"Location": f"/jobs/{job.id}"})


async def wait_for(state: Any, job_id: str, wait_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + wait_s
    while True:
        with state.sessions() as session:
            view = job_view(session, job_id)
        if view["done"] or time.monotonic() >= deadline:
            return view
        await asyncio.sleep(0.2)


def result_payload(state: Any, result_id: str) -> Any:
    with state.sessions() as session:
        row = session.get(Result, result_id)
        return forwards.with_states(session, row.payload, row.job_id) if row is not None else None


@router.get(
    "/jobs/{job_id}",
    summary="A job's status, progress per image, reason when it failed",
    dependencies=[Depends(require(Role.VIEWER))],
)
def get_job(job_id: str, session: SessionDep) -> dict[str, Any]:
    return job_view(session, job_id)


@router.get(
    "/studies/{study_uid}/results",
    summary="Every result for the study, newest first",
    dependencies=[Depends(require(Role.VIEWER))],
)
def study_results(study_uid: StudyUID, session: SessionDep) -> list[Any]:
    return [
        forwards.with_states(session, r.payload, r.job_id)
        for r in jobs.results_of(session, study_uid)
    ]


@router.get(
    "/studies/{study_uid}/results/{result_id}",
    summary="One result",
    dependencies=[Depends(require(Role.VIEWER))],
)
def study_result(study_uid: StudyUID, result_id: str, session: SessionDep) -> Any:
    row = _result(session, study_uid, result_id)
    return forwards.with_states(session, row.payload, row.job_id)  # the states now


def _result(session: Any, study_uid: str, result_id: str) -> Result:
    row = session.get(Result, result_id)
    if row is None or row.study_uid != study_uid:
        raise NotFound(f"no result {result_id!r} for study {study_uid}")
    assert isinstance(row, Result)
    return row


@router.get(
    "/studies/{study_uid}/results/{result_id}/overlays/{sop_uid}.png",
    summary="The saliency overlay of one image (PNG; the method the result names)",
    response_class=FileResponse,
    dependencies=[Depends(require(Role.VIEWER))],
)
def overlay_png(
    study_uid: StudyUID,
    result_id: str,
    sop_uid: Annotated[str, Path(pattern=UID_PATTERN)],
    session: SessionDep,
    state: StateDep,
) -> FileResponse:
    result = _result(session, study_uid, result_id)
    validate_uid(sop_uid, "SOP Instance UID")
    path = state.job_context.results_dir(result.id) / "overlays" / f"{sop_uid}.png"
    if not path.is_file():
        raise NotFound(f"result {result_id} has no overlay for image {sop_uid}")
    return FileResponse(path, media_type="image/png")
