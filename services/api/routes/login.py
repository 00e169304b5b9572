"""Browser sign-in: ``/login`` takes an API key once and sets a session cookie; ``/logout``.

The session cookie (``crgate_session``) is HttpOnly, SameSite=Strict, signed and expiring
(services.core.sessions); the CSRF cookie (``crgate_csrf``) is readable by the page's scripts,
which echo it in ``X-CSRF-Token`` (services.api.deps). Revoking the key ends its sessions.
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from services.api.deps import (
    CSRF_COOKIE,
    CSRF_HEADER,
    PUBLIC,
    SESSION_COOKIE,
    check_csrf,
    get_signer,
    get_state,
    same_origin,
    session_of,
)
from services.core.auth import verify_key
from services.core.sessions import Issued

router = APIRouter(tags=["browser session"], dependencies=[Depends(PUBLIC)])

MAX_FORM_BYTES = 8 * 1024

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>crgate: {title}</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 32rem; margin: 4rem auto; }}
input[type=password] {{ width: 100%; padding: .4rem; font: inherit; box-sizing: border-box; }}
button {{ margin-top: .8rem; padding: .4rem 1.2rem; font: inherit; }}
.error {{ color: #a00; }}
</style></head>
<body><main>
<h1>crgate</h1>
{body}
</main></body></html>
"""

_FORM = """<form method="post" action="/login">
<label for="key">API key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="{next}">
<button type="submit">Log in</button>
</form>
<p>Ask an administrator for a key (<code>crgate keys create</code>). The key stays in this
browser only as a signed session cookie that expires; revoking the key ends the session.</p>
"""

_SIGNED_IN = """<p id="who">Signed in as <strong>{name}</strong> ({role}).</p>
<p><a href="/ui">Console</a> &middot; <a href="/docs">API documentation</a></p>
<form method="post" action="/logout">
<input type="hidden" name="csrf_token" value="{csrf}">
<button type="submit">Log out</button>
</form>
"""


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(title=title, body=body), status_code=status)


def _safe_next(value: str | None) -> str:
    """A local path to go to after login; anything else (another site) goes to /login."""
    if value and value.startswith("/") and not value.startswith(("//", "/\\")):
        return value
    return "/login"


async def _form(request: Request) -> dict[str, str]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, detail=f"a login form is under {MAX_FORM_BYTES} bytes")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


@router.get("/login", summary="The login page", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> HTMLResponse:
    verified = session_of(request)
    if verified is None:
        return _page("log in", _FORM.format(next=html.escape(_safe_next(next))))
    body = _SIGNED_IN.format(
        name=html.escape(verified.principal.name),
        role=verified.principal.role.value,
        csrf=html.escape(verified.csrf),
    )
    return _page("signed in", body)


@router.post(
    "/login",
    summary="Log in with an API key (form field `key`): sets the session cookie",
    response_class=HTMLResponse,
    status_code=303,
)
async def login(request: Request) -> Response:
    if not same_origin(request):
        raise HTTPException(403, detail="log in from crgate's own /login page")
    form = await _form(request)
    key = form.get("key", "").strip()
    target = _safe_next(form.get("next"))
    state = get_state(request)
    with state.sessions() as session, session.begin():
        principal = verify_key(session, key) if key else None
        key_id = principal.key_id if principal else None
        issued = get_signer(request).issue(session, key_id) if key_id is not None else None
    if issued is None:
        message = "unknown or revoked API key" if key else "enter an API key"
        body = f'<p class="error" role="alert">{message}</p>' + _FORM.format(
            next=html.escape(target)
        )
        return _page("log in", body, status=401)
    response = RedirectResponse(target, status_code=303)
    _set_cookies(response, request, issued)
    return response


def _set_cookies(response: Response, request: Request, issued: Issued) -> None:
    state = get_state(request)
    common: dict[str, Any] = {
        "max_age": get_signer(request).lifetime_seconds,
        "path": "/",
        "samesite": "strict",
        "secure": state.settings.secure_cookies or request.url.scheme == "https",
    }
    response.set_cookie(SESSION_COOKIE, issued.token, httponly=True, **common)
    response.set_cookie(CSRF_COOKIE, issued.csrf, httponly=False, **common)


@router.post(
    "/logout",
    summary="End the browser session (clears its cookies); needs the CSRF token",
    status_code=303,
)
async def logout(request: Request) -> Response:
    verified = session_of(request)
    if verified is not None:  # a forged or expired cookie needs no protection to be cleared
        sent = request.headers.get(CSRF_HEADER)
        if sent is None:
            sent = (await _form(request)).get("csrf_token")
        check_csrf(request, verified, sent)
    response = RedirectResponse("/login", status_code=303)
    for name in (SESSION_COOKIE, CSRF_COOKIE):
        response.delete_cookie(name, path="/", samesite="strict")
    return response
