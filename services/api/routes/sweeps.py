"""CR safety studies as jobs: start one on stored studies, follow it, read its report."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from services.api.deps import SessionDep, StateDep, require
from services.core.auth import Principal, Role
from services.core.db.tables import Sweep
from services.lab import sweeps

MAX_SWEEPS = 500

router = APIRouter(tags=["cr safety study"], dependencies=[Depends(require(Role.OPERATOR))])


@router.post(
    "/studies:cr-sweep",
    status_code=202,
    summary="Measure how the model's AUROC changes with CR on labelled stored studies",
)
async def start_sweep(body: sweeps.SweepRequest, request: Request, state: StateDep) -> JSONResponse:
    principal: Principal | None = getattr(request.state, "principal", None)
    sweep = await run_in_threadpool(
        sweeps.request,
        state.job_context,
        state.queue,
        body,
        requested_by=principal.name if principal else None,
    )
    return JSONResponse(
        {"sweep": {"id": sweep.id, "status": sweep.status}, "status_url": f"/sweeps/{sweep.id}"},
        status_code=202,
        headers={"Location": f"/sweeps/{sweep.id}"},
    )


@router.get("/sweeps", summary="CR safety studies, newest first")
def list_sweeps(
    session: SessionDep, limit: Annotated[int, Query(ge=1, le=MAX_SWEEPS)] = 50
) -> list[dict[str, Any]]:
    ids = session.scalars(select(Sweep.id).order_by(Sweep.created_at.desc()).limit(limit)).all()
    return [sweeps.view(session, sweep_id) for sweep_id in ids]


@router.get("/sweeps/{sweep_id}", summary="A sweep's status, progress and recommendation")
def get_sweep(sweep_id: str, session: SessionDep) -> dict[str, Any]:
    return sweeps.view(session, sweep_id)


@router.get(
    "/sweeps/{sweep_id}/report/{name}",
    summary="A file of the sweep's report (report.html, results.json, CSVs, PNG plots)",
    response_class=FileResponse,
)
def report_file(sweep_id: str, name: str, session: SessionDep, state: StateDep) -> FileResponse:
    return FileResponse(sweeps.report_path(state.job_context, session, sweep_id, name))
