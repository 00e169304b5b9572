"""Who is looking at a console page: pages redirect to ``/login`` instead of answering 401."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import HTTPException, Request
from fastapi.responses import RedirectResponse

from services.api.deps import Access, session_of
from services.core.auth import Principal, Role

_VIEWER = Access(Role.VIEWER)


def signed_in(request: Request) -> Principal | None:
    """The caller (session cookie or Bearer key), or None when a login is needed."""
    try:
        return _VIEWER(request)
    except HTTPException as exc:
        if exc.status_code == 401:
            return None
        raise


def to_login(request: Request) -> RedirectResponse:
    """303 to ``/login?next=<this page>``."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='/')}", status_code=303)


def csrf_of(request: Request) -> str:
    """The session's CSRF token for the page's scripts (empty for a Bearer caller)."""
    verified = session_of(request)
    return verified.csrf if verified else ""


def refusal(role: Role, principal: Principal) -> str | None:
    """The API's 403 text when ``principal`` lacks ``role``, else None."""
    if principal.role.allows(role):
        return None
    return f"this needs the {role.value} role; key {principal.name!r} has {principal.role.value}"
