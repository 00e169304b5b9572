"""CORS (Fetch standard) for the origins in CRGATE_CORS_ORIGINS, and honest OPTIONS and Allow.

- A preflight (OPTIONS with Origin and Access-Control-Request-Method) from an allowed origin gets
  204 with Access-Control-Allow-Origin, -Methods (what the path really has), -Headers, -Max-Age
  and -Expose-Headers; from any other origin 403 (the browser then refuses the request).
- Other requests from an allowed origin get Allow-Origin and Expose-Headers on their answer.
  Credentials are not allowed cross-origin: another origin's page sends a Bearer key; the
  session cookie is for pages crgate serves itself.
- A plain OPTIONS on a known path answers 204 with ``Allow``; no route answers 405 to OPTIONS.
- A 405 lists in ``Allow`` every method of every route at that path (e.g. GET and POST on
  /dicomweb/studies), not only those of the first route that matched it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from starlette.routing import Route

from services.api.problems import problem

ALLOW_HEADERS = "Authorization, Accept, Content-Type, Range, If-Range, If-None-Match"
EXPOSE_HEADERS = (
    "Content-Type, Warning, Location, Content-Location, Content-Range, Accept-Ranges, ETag"
)
MAX_AGE_SECONDS = 600


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method the routes at ``path`` answer, with OPTIONS; empty for an unknown path."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.path_regex.match(path):
            methods |= route.methods or {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"}
    return sorted(methods | {"OPTIONS"}) if methods else []


def install(app: FastAPI, origins: frozenset[str]) -> None:
    """Add the middleware to ``app`` for the allow-list ``origins``."""

    async def cors(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        origin = request.headers.get("origin")
        if request.method == "OPTIONS":
            methods = allowed_methods(app, request.url.path)
            if methods:
                return _options(request, origin, methods, origins)
        response = await call_next(request)
        if response.status_code == 405:
            methods = allowed_methods(app, request.url.path)
            if methods:
                response.headers["Allow"] = ", ".join(methods)
        if origin is not None and origin in origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        if origins:
            response.headers.append("Vary", "Origin")
        return response

    app.middleware("http")(cors)


def _options(
    request: Request, origin: str | None, methods: list[str], origins: frozenset[str]
) -> Response:
    allow = ", ".join(methods)
    preflight = origin is not None and "access-control-request-method" in request.headers
    if not preflight:
        return Response(status_code=204, headers={"Allow": allow})
    if origin not in origins:
        response = problem(
            403,
            "Forbidden",
            f"origin {origin!r} may not call this API from a browser; an administrator can add "
            "it to CRGATE_CORS_ORIGINS",
        )
        response.headers["Allow"] = allow
        response.headers["Vary"] = "Origin"
        return response
    return Response(
        status_code=204,
        headers={
            "Allow": allow,
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": allow,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": str(MAX_AGE_SECONDS),
            "Access-Control-Expose-Headers": EXPOSE_HEADERS,
            "Vary": "Origin",
        },
    )
