"""``/docs`` (Swagger UI) and ``/redoc`` served offline, and the OpenAPI's security schemes.

The Swagger UI and ReDoc bundles come from the installed ``fastapi-offline`` package (a main
dependency) and are served by crgate under ``/docs/assets/``: the pages load nothing from
another host (no CDN, no web fonts, no validator badge, ReDoc's logo pointed at a local image).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute

from services.api.deps import PUBLIC, SESSION_COOKIE, Access
from services.core.errors import NotFound

ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
BEARER = "bearerAuth"
COOKIE = "sessionCookie"

router = APIRouter(dependencies=[Depends(PUBLIC)], include_in_schema=False)


# the one outside URL a bundle loads by itself (ReDoc's sidebar logo), pointed at our own asset
REWRITES = {"redoc.standalone.js": (b"https://cdn.redoc.ly/redoc/logo-mini.svg", b"favicon.png")}


@lru_cache(maxsize=len(ASSETS))
def _asset_bytes(name: str) -> bytes:
    data = (ASSETS_DIR / name).read_bytes()
    if name in REWRITES:
        outside, local = REWRITES[name]
        data = data.replace(outside, b"/docs/assets/" + local)
    return data


@router.get("/docs/assets/{name}")
def docs_asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound(f"no documentation asset {name!r}")
    return Response(
        _asset_bytes(name),
        media_type=ASSETS[name],
        headers={"Cache-Control": "public, max-age=86400"},
    )


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title}: API",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT}",
        swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/assets/favicon.png",
        swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": False},
    )


@router.get(OAUTH2_REDIRECT)
def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title}: API",
        redoc_js_url=f"{root}/docs/assets/redoc.standalone.js",
        redoc_favicon_url=f"{root}/docs/assets/favicon.png",
        with_google_fonts=False,
    )


def _access_rule(route: APIRoute) -> Access | None:
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        if isinstance(dep.call, Access):
            return dep.call
        stack.extend(dep.dependencies)
    return None


ROLE_EXTENSION = "x-crgate-role"  # the role an operation needs, in the OpenAPI document


def install_openapi(app: FastAPI) -> None:
    """The schema declares a Bearer scheme (the /docs Authorize button) and the session cookie;
    every protected operation lists both, with the role it needs in its description."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            routes=app.routes,
        )
        schema.setdefault("components", {})["securitySchemes"] = {
            BEARER: {
                "type": "http",
                "scheme": "bearer",
                "description": "an API key (`crgate keys create`; the first one is "
                "<data-dir>/admin.key)",
            },
            COOKIE: {
                "type": "apiKey",
                "in": "cookie",
                "name": SESSION_COOKIE,
                "description": "a browser session from /login; state-changing requests also "
                "send X-CSRF-Token",
            },
        }
        paths = schema.get("paths", {})
        for route in app.routes:
            if not isinstance(route, APIRoute) or not route.include_in_schema:
                continue
            rule = _access_rule(route)
            role = rule.role.value if rule is not None and rule.role is not None else "public"
            for method in route.methods:
                operation = paths.get(route.path_format, {}).get(method.lower())
                if operation is not None:
                    operation[ROLE_EXTENSION] = role
            if role == "public":
                continue
            assert rule is not None and rule.role is not None
            for method in route.methods:
                operation = paths.get(route.path_format, {}).get(method.lower())
                if operation is not None:
                    operation["security"] = [{BEARER: []}, {COOKIE: []}]
                    text = operation.get("description", "")
                    operation["description"] = f"{text}\n\nNeeds the {rule.role.value} role."
                    operation["description"] = operation["description"].strip()
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
