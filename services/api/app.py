"""The FastAPI application factory."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Response
from starlette.routing import Match

from services.api import cors, deps, problems, viewer
from services.api.routes import (
    classify,
    compress,
    console,
    deletion,
    destinations,
    docs,
    forwards,
    login,
    models,
    ops,
    policies,
    sweeps,
)
from services.core.config import Settings, get_settings
from services.core.sessions import SessionSigner, load_secret
from services.core.telemetry import HTTP_LATENCY
from services.runtime import Runtime, build_runtime


def create_app(settings: Settings | None = None, *, state: Runtime | None = None) -> FastAPI:
    """Build the app; ``state`` lets `crgate serve` share one ingest path with the SCP."""
    settings = settings or (state.settings if state else get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = state is None
        app.state.crgate = state if state is not None else build_runtime(settings)
        secret = load_secret(settings.session_secret, settings.data_dir)
        app.state.session_signer = SessionSigner(secret, settings.session_hours * 3600)
        yield
        if owned:
            app.state.crgate.close()

    app = FastAPI(
        title="crgate",
        summary="DICOMweb-compatible JPEG 2000 compression-and-inference gateway",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served offline by routes/docs.py
        redoc_url=None,
        dependencies=[Depends(deps.refuse_nul)],
    )
    problems.install(app)
    app.middleware("http")(_record_latency)
    cors.install(app, settings.cors_origin_set)
    docs.install_openapi(app)
    app.include_router(docs.router)
    app.include_router(login.router)
    app.include_router(ops.router)
    app.include_router(policies.router)
    app.include_router(sweeps.router)
    app.include_router(classify.router)
    app.include_router(compress.router)
    app.include_router(models.router)
    app.include_router(destinations.router)
    app.include_router(forwards.router)
    app.include_router(deletion.router)
    app.include_router(console.router)
    _include_dicomweb(app)
    if settings.viewer_dir is not None:
        viewer.install(app, settings.viewer_dir)
    return app


def _include_dicomweb(app: FastAPI) -> None:
    from services.api.dicomweb import router as dicomweb_router

    app.include_router(dicomweb_router, prefix="/dicomweb")


async def _record_latency(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    start = time.perf_counter()
    response = await call_next(request)
    route = "unmatched"
    for candidate in request.app.router.routes:
        match, _ = candidate.matches(request.scope)
        if match is Match.FULL:
            route = getattr(candidate, "path", "unmatched")
            break
    HTTP_LATENCY.labels(request.method, route, str(response.status_code)).observe(
        time.perf_counter() - start
    )
    return response
