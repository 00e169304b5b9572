"""Errors as RFC 9457 problem JSON: core errors, validation errors and HTTP errors alike."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.core.errors import (
    CodecError,
    Conflict,
    CrgateError,
    Forbidden,
    InvalidInput,
    NotFound,
    OutputError,
    TooLarge,
    UnsupportedSyntax,
)

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
DICOMWEB_PREFIX = "/dicomweb/"


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def status_of(exc: CrgateError, *, dicomweb: bool = False) -> int:
    """The one mapping of core errors to HTTP statuses; routes never re-map them.

    Wrong input (InvalidInput and its kinds: a bad UID, CR, query key, a study without an image
    the model reads) is 422 on crgate's own API, like FastAPI's request validation, and 400 on
    DICOMweb, as PS3.18 asks of an invalid query or request. A codec that cannot do what was
    asked is 422; an unsupported transfer syntax 406; a size limit (TooLarge) 413.
    """
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, UnsupportedSyntax):
        return 406
    if isinstance(exc, CodecError):
        return 422
    if isinstance(exc, TooLarge):
        return 413
    if isinstance(exc, InvalidInput):
        return 400 if dicomweb else 422
    if isinstance(exc, OutputError):
        return 503
    return 500


TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    406: "Not Acceptable",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    500: "Internal Error",
    503: "Service Unavailable",
}


def install(app: FastAPI) -> None:
    @app.exception_handler(CrgateError)
    async def _crgate(request: Request, exc: CrgateError) -> JSONResponse:
        status = status_of(exc, dicomweb=request.url.path.startswith(DICOMWEB_PREFIX))
        return problem(status, TITLES.get(status, "Error"), str(exc), **exc.details)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()))
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
        return problem(422, "Unprocessable Content", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = problem(exc.status_code, TITLES.get(exc.status_code, "Error"), str(exc.detail))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.middleware("http")
    async def _internal(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """An unexpected error becomes a 500 problem here, inside the app: Starlette's
        outermost error handler would answer it too but then re-raise it to the server,
        which closes the client's keep-alive connection."""
        try:
            return await call_next(request)
        except Exception as exc:
            log.exception("unhandled error: %s", type(exc).__name__)
            return problem(
                500, "Internal Error", f"internal error ({type(exc).__name__}); see the log"
            )
