"""CORS for allowed origins, honest OPTIONS and Allow on every route, /docs and /redoc offline."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.core.config import Settings
from services.runtime import Runtime, build_runtime
from tests.api.test_access import concrete

ALLOWED = "http://viewer.example:3000"
PREFLIGHT = {"Origin": ALLOWED, "Access-Control-Request-Method": "GET"}


@pytest.fixture
def cors_state(tmp_path: Path, database_url: str) -> Iterator[Runtime]:
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=database_url,
        cors_origins=f"{ALLOWED}/, http://other.example",
    )
    state = build_runtime(settings, create=True)
    yield state
    state.close()


@pytest.fixture
def cors_client(cors_state: Runtime) -> Iterator[TestClient]:
    key = (cors_state.settings.data_dir / "admin.key").read_text().strip()
    with TestClient(create_app(state=cors_state), headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


def test_preflight_from_an_allowed_origin_header_by_header(cors_client: TestClient) -> None:
    response = cors_client.options(
        "/dicomweb/studies",
        headers={**PREFLIGHT, "Access-Control-Request-Headers": "authorization, accept"},
    )
    assert response.status_code == 204 and response.content == b""
    h = response.headers
    assert h["access-control-allow-origin"] == ALLOWED
    assert h["access-control-allow-methods"] == "GET, OPTIONS, POST"
    assert h["access-control-allow-headers"] == (
        "Authorization, Accept, Content-Type, Range, If-Range, If-None-Match"
    )
    assert h["access-control-max-age"] == "600"
    exposed = [v.strip() for v in h["access-control-expose-headers"].split(",")]
    assert exposed[:4] == ["Content-Type", "Warning", "Location", "Content-Location"]
    assert h["vary"] == "Origin"
    assert h["allow"] == "GET, OPTIONS, POST"
    assert "access-control-allow-credentials" not in h  # cross-origin pages use a Bearer key


def test_preflight_from_another_origin_is_refused(cors_client: TestClient) -> None:
    response = cors_client.options(
        "/dicomweb/studies",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert response.status_code == 403
    assert "access-control-allow-origin" not in response.headers
    assert "CRGATE_CORS_ORIGINS" in response.json()["detail"]


def test_answers_carry_allow_origin_only_for_allowed_origins(cors_client: TestClient) -> None:
    allowed = cors_client.get("/dicomweb/studies", headers={"Origin": ALLOWED})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED
    assert "Warning" in allowed.headers["access-control-expose-headers"]
    other = cors_client.get("/dicomweb/studies", headers={"Origin": "http://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    assert other.headers["vary"] == "Origin"


def test_no_cors_headers_by_default(client: TestClient) -> None:
    preflight = client.options("/dicomweb/studies", headers=PREFLIGHT)
    assert preflight.status_code == 403
    answer = client.get("/dicomweb/studies", headers={"Origin": ALLOWED})
    assert "access-control-allow-origin" not in answer.headers


def test_no_route_answers_405_to_options_and_allow_is_true(
    app: FastAPI, client: TestClient
) -> None:
    by_path: dict[str, set[str]] = {}
    for route in app.routes:
        if isinstance(route, APIRoute):
            by_path.setdefault(concrete(route.path), set()).update(route.methods)
    checked = 0
    for path, methods in by_path.items():
        response = client.options(path)
        assert response.status_code == 204, f"OPTIONS {path}: {response.status_code}"
        allow = set(response.headers["allow"].split(", "))
        # a concrete path may also match a sibling template (e.g. /policies/{id} vs :preview)
        assert methods | {"OPTIONS"} <= allow, (path, allow)
        checked += 1
    assert checked >= 20
    assert client.options("/no/such/path").status_code == 404


def test_405_lists_every_method_of_the_path(client: TestClient) -> None:
    response = client.put("/dicomweb/studies")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, OPTIONS, POST"


def test_docs_and_redoc_load_only_local_assets(anon_client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        response = anon_client.get(page)
        assert response.status_code == 200
        sources = re.findall(r'(?:src|href)="([^"]+)"', response.text)
        sources += re.findall(r"url: '([^']+)'", response.text)
        assert sources, page
        for source in sources:
            assert source.startswith("/"), f"{page} loads {source}"
            assert anon_client.get(source).status_code == 200, source
        assert "fonts.googleapis" not in response.text and "cdn." not in response.text
    assert '"validatorUrl": null' in anon_client.get("/docs").text
    assert anon_client.get("/docs/assets/../admin.key").status_code == 404


def test_openapi_declares_bearer_and_session_schemes(anon_client: TestClient) -> None:
    schema = anon_client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["bearerAuth"]["description"],
    }
    assert schemes["sessionCookie"]["in"] == "cookie"
    qido = schema["paths"]["/dicomweb/studies"]["get"]
    assert qido["security"] == [{"bearerAuth": []}, {"sessionCookie": []}]
    assert "viewer role" in qido["description"]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    assert "admin role" in schema["paths"]["/policies"]["post"]["description"]
