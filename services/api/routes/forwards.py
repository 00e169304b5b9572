"""Forwards: each object sent (or to send) to a destination, its state, and re-sending."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from services.api.deps import SessionDep, StateDep, require
from services.core import forwards
from services.core.auth import Principal, Role

router = APIRouter(tags=["forwards"])
OPERATOR = require(Role.OPERATOR)
OperatorDep = Annotated[Principal | None, Depends(OPERATOR)]
STATES = ", ".join(s.value for s in forwards.ForwardState)


class ForwardOut(BaseModel):
    id: str
    destination: str = Field(description="the destination's name (kept if it was deleted)")
    destination_id: int | None
    study_uid: str
    sop_instance_uid: str
    what: str = Field(description="original, compressed or result")
    job_id: str | None
    state: str = Field(description=STATES)
    attempts: int
    syntax: str | None = Field(description="the transfer syntax that went out")
    status: str | None = Field(description="the peer's last status, e.g. 0xC000")
    error: str | None = Field(description="the peer's Error Comment, or the connection fault")
    next_attempt_at: str | None = Field(description="when it is tried next (queued, retrying)")
    created_at: str
    updated_at: str
    requested_by: str | None


class ForwardPage(BaseModel):
    items: list[ForwardOut]
    total: int
    limit: int
    offset: int


class Resent(BaseModel):
    resent: int = Field(description="how many forwards went back to queued")
    forward_ids: list[str]


def _actor(principal: Principal | None) -> str:
    return principal.name if principal is not None else "unknown"


@router.get(
    "/forwards",
    summary="Forwards, newest first (e.g. ?state=failed)",
    response_model=ForwardPage,
    dependencies=[Depends(require(Role.VIEWER))],
)
def list_forwards(
    session: SessionDep,
    state: Annotated[str | None, Query(description=f"only this state: {STATES}")] = None,
    destination: Annotated[
        str | None, Query(description="only this destination (name, AE title or id)")
    ] = None,
    study_uid: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=forwards.MAX_LIMIT)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> ForwardPage:
    rows, total = forwards.list_forwards(
        session,
        state=state,
        destination=destination,
        study_uid=study_uid,
        limit=limit,
        offset=offset,
    )
    items = [ForwardOut(**forwards.snapshot(r)) for r in rows]
    return ForwardPage(items=items, total=total, limit=limit, offset=offset)


@router.get(
    "/forwards/{forward_id}",
    summary="One forward",
    response_model=ForwardOut,
    dependencies=[Depends(require(Role.VIEWER))],
)
def get_forward(forward_id: str, session: SessionDep) -> Any:
    return ForwardOut(**forwards.snapshot(forwards.get_forward(session, forward_id)))


@router.post(
    "/forwards/{forward_id}/resend",
    summary="Send a failed forward again (audit-logged)",
    response_model=Resent,
    responses={409: {"description": "the forward is not failed"}},
)
def resend_one(forward_id: str, state: StateDep, principal: OperatorDep) -> Resent:
    ids = forwards.resend(
        state.sessions, state.queue, actor=_actor(principal), forward_id=forward_id
    )
    return Resent(resent=len(ids), forward_ids=ids)


@router.post(
    "/forwards:resend",
    summary="Send every failed forward (of a destination) again (audit-logged)",
    response_model=Resent,
)
def resend_many(
    state: StateDep,
    principal: OperatorDep,
    forward_state: Annotated[
        str, Query(alias="state", description="which forwards: failed (the only one re-sent)")
    ] = "failed",
    destination: Annotated[
        str | None, Query(description="only this destination (name, AE title or id)")
    ] = None,
) -> Resent:
    ids = forwards.resend(
        state.sessions,
        state.queue,
        actor=_actor(principal),
        state=forward_state,
        destination=destination,
    )
    return Resent(resent=len(ids), forward_ids=ids)
