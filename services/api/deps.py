"""FastAPI dependencies: the process state, a database session, and who is calling.

Every route declares its access with exactly one of ``require(Role.X)`` or ``PUBLIC``;
tests walk the route table and check it (tests/api/test_access.py).
"""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from services.core.auth import Principal, Role, verify_key
from services.core.params import check_text
from services.runtime import Runtime


def get_state(request: Request) -> Runtime:
    state: Runtime = request.app.state.crgate
    return state


StateDep = Annotated[Runtime, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


class Access:
    """A route's access rule; ``role`` None means public. Callable as a FastAPI dependency."""

    def __init__(self, role: Role | None, *, anonymous_read: bool = False) -> None:
        self.role = role
        self.anonymous_read = anonymous_read  # honour CRGATE_ANONYMOUS_READ on this route

    def __call__(self, request: Request) -> Principal | None:
        if self.role is None:
            return None
        state = get_state(request)
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            if self.anonymous_read and state.settings.anonymous_read and self.role is Role.VIEWER:
                return Principal(name="anonymous", role=Role.VIEWER, key_id=None)
            raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("malformed Authorization header: use 'Bearer <key>'")
        with state.sessions() as session, session.begin():
            principal = verify_key(session, token.strip())
        if principal is None:
            raise _unauthorized("unknown or revoked API key")
        if not principal.role.allows(self.role):
            raise HTTPException(
                status_code=403,
                detail=f"this needs the {self.role.value} role; key "
                f"{principal.name!r} has {principal.role.value}",
            )
        request.state.principal = principal
        return principal


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


PUBLIC = Access(None)


def require(role: Role, *, anonymous_read: bool = False) -> Access:
    return Access(role, anonymous_read=anonymous_read)


def refuse_nul(request: Request) -> None:
    """Every route's path and query parameters are free of NUL (PostgreSQL refuses it in text,
    and no identifier, key or matching value holds one); an app-wide dependency."""
    for name, value in request.path_params.items():
        if isinstance(value, str):
            check_text(value, f"path parameter {name}")
    for name, value in request.query_params.multi_items():
        check_text(name, f"query parameter name {name[:64]!r}")
        check_text(value, f"query parameter {name}")


READ_DICOMWEB = require(Role.VIEWER, anonymous_read=True)
PrincipalDep = Annotated[Principal | None, Depends(PUBLIC)]
