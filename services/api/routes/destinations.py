"""Destinations (admin): the PACS crgate forwards to, and a C-ECHO to test one."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field

from services.api.deps import SessionDep, StateDep, require
from services.core import destinations
from services.core.auth import Principal, Role
from services.core.db.tables import Destination
from services.core.destinations import DestinationChanges, DestinationSpec
from services.runtime.forwarding import echo

router = APIRouter(tags=["destinations"])
ADMIN = require(Role.ADMIN)
AdminDep = Annotated[Principal | None, Depends(ADMIN)]
SYNTAXES_HELP = (
    "transfer syntax UIDs it accepts; left out, detected at the first association (echo)"
)


class DestinationIn(BaseModel):
    name: str = Field(description="what people call it, e.g. main PACS")
    ae_title: str = Field(description="its AE title (1 to 16 characters)")
    host: str = Field(description="host name or IP address")
    port: int = Field(description="DICOM port, 1 to 65535")
    syntaxes: list[str] | None = Field(None, description=SYNTAXES_HELP)


class DestinationUpdate(BaseModel):
    name: str | None = None
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    syntaxes: list[str] | None = Field(None, description=SYNTAXES_HELP)


class DestinationOut(BaseModel):
    id: int
    name: str
    ae_title: str
    host: str
    port: int
    syntaxes: list[str] | None = Field(description="accepted transfer syntaxes; null: unknown")
    created_at: datetime
    updated_at: datetime


class EchoOut(BaseModel):
    destination: DestinationOut
    reachable: bool
    status: str | None = Field(description="the C-ECHO status, e.g. 0x0000")
    rtt_ms: float = Field(description="association, echo and its answer, in milliseconds")
    accepted_syntaxes: list[str] = Field(
        description="of the syntaxes crgate may send, those it accepted for CT Image Storage"
    )
    error: str | None


def _actor(principal: Principal | None) -> str:
    return principal.name if principal is not None else "unknown"


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _out(row: Destination) -> DestinationOut:
    return DestinationOut(
        id=row.id,
        name=row.name,
        ae_title=row.ae_title,
        host=row.host,
        port=row.port,
        syntaxes=row.syntaxes,
        created_at=_utc(row.created_at),
        updated_at=_utc(row.updated_at),
    )


@router.get(
    "/destinations",
    summary="List destinations",
    response_model=list[DestinationOut],
    dependencies=[Depends(ADMIN)],
)
def list_destinations(session: SessionDep) -> list[DestinationOut]:
    return [_out(row) for row in destinations.list_destinations(session)]


@router.post(
    "/destinations",
    summary="Add a destination",
    status_code=201,
    response_model=DestinationOut,
    responses={409: {"description": "a destination with that name or AE title exists"}},
)
def create_destination(body: DestinationIn, session: SessionDep, principal: AdminDep) -> Any:
    with session.begin():
        spec = DestinationSpec(body.name, body.ae_title, body.host, body.port, body.syntaxes)
        return _out(destinations.create_destination(session, spec, actor=_actor(principal)))


@router.get(
    "/destinations/{key}",
    summary="One destination, by id, name or AE title",
    response_model=DestinationOut,
    dependencies=[Depends(ADMIN)],
)
def get_destination(key: str, session: SessionDep) -> DestinationOut:
    return _out(destinations.get_destination(session, key))


@router.put(
    "/destinations/{key}",
    summary="Change a destination (fields left out keep their values)",
    response_model=DestinationOut,
)
def update_destination(
    key: str, body: DestinationUpdate, session: SessionDep, principal: AdminDep
) -> Any:
    changes: DestinationChanges = {}
    for field in ("name", "ae_title", "host", "port"):
        value = getattr(body, field)
        if value is not None:
            changes[field] = value
    if "syntaxes" in body.model_fields_set:
        changes["syntaxes"] = body.syntaxes
    with session.begin():
        row = destinations.update_destination(session, key, changes, actor=_actor(principal))
        return _out(row)


@router.delete(
    "/destinations/{key}",
    summary="Remove a destination",
    status_code=204,
    response_class=Response,
)
def delete_destination(key: str, session: SessionDep, principal: AdminDep) -> Response:
    with session.begin():
        destinations.delete_destination(session, key, actor=_actor(principal))
    return Response(status_code=204)


@router.post(
    "/destinations/{key}/echo",
    summary="C-ECHO a destination: status, round-trip time, the syntaxes it accepts",
    response_model=EchoOut,
    dependencies=[Depends(ADMIN)],
)
def echo_destination(key: str, session: SessionDep, state: StateDep) -> EchoOut:
    with session.begin():
        row = destinations.get_destination(session, key)
        row_id, target = row.id, f"{row.ae_title}@{row.host}:{row.port}"
    result = echo(target, state.settings.ae_title)  # a sync route: FastAPI's thread pool
    with session.begin():
        row = destinations.get_destination(session, row_id)
        if result.reachable:
            destinations.record_detected(session, row, result.accepted_syntaxes)
        out = _out(row)
    return EchoOut(
        destination=out,
        reachable=result.reachable,
        status=None if result.status is None else f"0x{result.status:04X}",
        rtt_ms=round(result.rtt_ms, 1),
        accepted_syntaxes=result.accepted_syntaxes,
        error=result.error,
    )
