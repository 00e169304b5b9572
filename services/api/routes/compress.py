"""Compression on request: every image of a stored study, of any modality, at a CR."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from services.api.deps import StateDep, require
from services.api.routes.classify import (
    MAX_WAIT_S,
    OverrideReason,
    StudyUID,
    result_payload,
    wait_for,
)
from services.core import compress
from services.core.auth import Principal, Role
from services.core.codecs import SYNTAX_HELP
from services.core.contracts import JobTrigger
from services.core.dicom.uids import validate_uid
from services.core.ratio import CompressionRatio

router = APIRouter(tags=["classification"])


@router.post(
    "/studies/{study_uid}/compress",
    status_code=202,
    summary="Compress every image of a study at a CR (the policies' CRs when cr is omitted)",
    description="Makes compress jobs: one with `cr`; without it, one per policy the study's "
    "series fall under. The answer lists each job (`jobs`), with its result once done. Each "
    "result has per image the achieved CR, PSNR, SSIM, max error, bytes, frames and timings, "
    "and the images the transcoder cannot code, with the reason (`skipped`).",
    dependencies=[Depends(require(Role.OPERATOR))],
)
async def post_compress(
    request: Request,
    state: StateDep,
    study_uid: StudyUID,
    cr: Annotated[
        float | None, Query(description="compression ratio; 1 = lossless; omit for the policies")
    ] = None,
    syntax: Annotated[str | None, Query(description=SYNTAX_HELP)] = None,
    store: Annotated[
        bool | None,
        Query(
            description="store the copies in the patient's study as derived series (default: "
            "the policy's keep_copy; true with cr); false: results only (a research copy)"
        ),
    ] = None,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for the results")
    ] = 0,
    reason: OverrideReason = None,
) -> JSONResponse:
    principal: Principal | None = getattr(request.state, "principal", None)
    validate_uid(study_uid, "Study Instance UID")
    made = await run_in_threadpool(
        compress.request,
        state.job_context,
        state.queue,
        study_uid,
        cr=None if cr is None else CompressionRatio(cr),
        syntax=syntax,
        trigger=JobTrigger.API,
        requested_by=principal.name if principal else None,
        keep_copy=store,
        may_exceed_ceiling=principal is not None and principal.role is Role.ADMIN,
        reason=reason,
    )
    deadline = time.monotonic() + wait
    entries: list[dict[str, Any]] = []
    for job, _created in made:
        view = await wait_for(state, job.id, max(0.0, deadline - time.monotonic()))
        entry: dict[str, Any] = {"job": view, "status_url": f"/jobs/{job.id}"}
        if view["result_id"]:
            entry["result"] = await run_in_threadpool(result_payload, state, view["result_id"])
            entry["result_url"] = f"/studies/{study_uid}/results/{view['result_id']}"
        entries.append(entry)
    if all("result" in e for e in entries):
        return JSONResponse({"jobs": entries}, status_code=200)
    first = entries[0]["job"]["id"]
    return JSONResponse({"jobs": entries}, status_code=202, headers={"Location": f"/jobs/{first}"})
