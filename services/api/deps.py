"""FastAPI dependencies: the process state, a database session, and who is calling.

Every route declares its access with exactly one of ``require(Role.X)`` or ``PUBLIC``;
tests walk the route table and check it (tests/api/test_access.py).

A caller is a Bearer key (``Authorization: Bearer <key>``) or, without that header, a browser
session (the ``crgate_session`` cookie set by ``/login``). A state-changing request (not GET,
HEAD, OPTIONS) authenticated by the cookie must echo the session's CSRF token in an
``X-CSRF-Token`` header (the ``crgate_csrf`` cookie holds it), and an ``Origin`` it carries must
be this server's own: the signed double-submit pattern plus an origin check (OWASP).
"""

import hmac
from collections.abc import Iterator
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from services.core.auth import Principal, Role, verify_key
from services.core.params import check_text
from services.core.sessions import SessionSigner, Verified
from services.runtime import Runtime

SESSION_COOKIE = "crgate_session"
CSRF_COOKIE = "crgate_csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def get_state(request: Request) -> Runtime:
    state: Runtime = request.app.state.crgate
    return state


StateDep = Annotated[Runtime, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_signer(request: Request) -> SessionSigner:
    signer: SessionSigner = request.app.state.session_signer
    return signer


def session_of(request: Request) -> Verified | None:
    """The request's valid browser session, or None (no cookie, or forged, expired, revoked)."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    with get_state(request).sessions() as session, session.begin():
        return get_signer(request).verify(session, token)


def same_origin(request: Request) -> bool:
    """False when the request carries an Origin (or, lacking one, a Referer) of another host."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return True
    return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()


def check_csrf(request: Request, verified: Verified, sent: str | None) -> None:
    """403 unless ``sent`` is the session's CSRF token and the request comes from this origin."""
    if not same_origin(request):
        raise HTTPException(403, detail="cross-origin request with a session cookie refused")
    if not sent or not hmac.compare_digest(sent.encode(), verified.csrf.encode()):
        raise HTTPException(
            403,
            detail=f"missing or wrong {CSRF_HEADER} header: a state-changing request signed in "
            f"by the session cookie must send the {CSRF_COOKIE} cookie's value in it",
        )


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
        principal: Principal | None
        if not header:
            principal = self._from_cookie(request, state)
        else:
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

    def _from_cookie(self, request: Request, state: Runtime) -> Principal:
        verified = session_of(request)
        if verified is not None:
            if request.method not in SAFE_METHODS:
                check_csrf(request, verified, request.headers.get(CSRF_HEADER))
            return verified.principal
        if self.anonymous_read and state.settings.anonymous_read and self.role is Role.VIEWER:
            return Principal(name="anonymous", role=Role.VIEWER, key_id=None)
        if SESSION_COOKIE in request.cookies:
            raise _unauthorized("session expired or its key revoked: log in again at /login")
        raise _unauthorized(
            "missing API key: send 'Authorization: Bearer <key>' or log in at /login"
        )


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
