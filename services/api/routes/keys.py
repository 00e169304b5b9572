"""API keys over HTTP (admin): list, create (the key is shown once), revoke; audit-logged."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.api.deps import SessionDep, require
from services.core.auth import Principal, Role, create_key, list_keys, parse_role, revoke_key
from services.core.db.tables import ApiKey

router = APIRouter(tags=["api keys"], dependencies=[Depends(require(Role.ADMIN))])


class KeyIn(BaseModel):
    name: str = Field(min_length=1, max_length=128, description="who or what uses the key")
    role: str = Field("viewer", description="admin, operator or viewer")


def _when(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def key_view(row: ApiKey) -> dict[str, Any]:
    """A key as the API shows it: never its secret or hash."""
    return {
        "id": row.id,
        "prefix": row.prefix,
        "name": row.name,
        "role": row.role,
        "created_at": _when(row.created_at),
        "last_used_at": _when(row.last_used_at),
        "revoked_at": _when(row.revoked_at),
    }


def _actor(request: Request) -> str:
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal.name if principal else "system"


@router.get("/keys", summary="List API keys (id, prefix, name, role, dates; never the secret)")
def get_keys(session: SessionDep) -> list[dict[str, Any]]:
    return [key_view(row) for row in list_keys(session)]


@router.post(
    "/keys",
    status_code=201,
    summary="Create an API key; the answer's `key` is shown this once and never stored",
)
def post_key(body: KeyIn, request: Request, session: SessionDep) -> JSONResponse:
    role = parse_role(body.role)
    with session.begin():
        row, token = create_key(session, name=body.name, role=role, actor=_actor(request))
        view = key_view(row)
    return JSONResponse({**view, "key": token}, status_code=201)


@router.delete(
    "/keys/{key}",
    summary="Revoke an API key by id or prefix (its browser sessions end too)",
)
def delete_key(
    key: Annotated[str, Path(max_length=16, description="the key's id or prefix")],
    request: Request,
    session: SessionDep,
) -> dict[str, Any]:
    with session.begin():
        row = revoke_key(session, key=key, actor=_actor(request))
        return key_view(row)
