"""Operations: liveness, readiness, Prometheus metrics (public, no patient data)."""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlparse

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from services.api.deps import PUBLIC, StateDep
from services.core import policies

router = APIRouter(tags=["operations"], dependencies=[Depends(PUBLIC)])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Database, storage and broker (when configured) are reachable; how many CR "
    "policies are above their ceiling without a reason",
)
def readyz(state: StateDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    violations: int | None = None
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
        with state.sessions() as session:
            violations = len(policies.violations(session))
    except SQLAlchemyError as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    checks["storage"] = "ok" if state.store.writable() else "not writable"
    if state.settings.broker_url:
        checks["broker"] = _broker_check(state.settings.broker_url)
    ready = all(v == "ok" for v in checks.values())
    # policies above their ceiling serve on (readiness is about reaching the parts), but say so
    body: dict[str, Any] = {"status": "ready" if ready else "not ready", "checks": checks}
    body["policy_violations"] = violations
    return JSONResponse(body, status_code=200 if ready else 503)


def _broker_check(url: str) -> str:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "localhost", parsed.port or 6379), 2):
            return "ok"
    except OSError as exc:
        return f"unreachable: {exc.strerror or exc}"


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
