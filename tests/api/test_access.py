"""Access control over the whole route table: every route declares a role, and enforces it."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from services.api.deps import Access
from services.core.auth import Role, revoke_key
from services.runtime import Runtime

UID = "1.2.826.0.1.3680043.8.498.1"


def access_of(route: APIRoute) -> list[Access]:
    found = []
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        if isinstance(dep.call, Access):
            found.append(dep.call)
        stack.extend(dep.dependencies)
    return found


def api_routes(app: FastAPI) -> list[APIRoute]:
    return [r for r in app.routes if isinstance(r, APIRoute)]


def concrete(path: str) -> str:
    path = re.sub(r"\{[a-z_]*(study|series|sop|instance)[a-z_]*\}", UID, path)
    path = re.sub(r"\{[a-z_]*(frame|frames)[a-z_]*\}", "1", path)
    return re.sub(r"\{[^}]+\}", "1", path)


def test_every_route_declares_exactly_one_access_rule(app: FastAPI) -> None:
    routes = api_routes(app)
    assert len(routes) >= 3
    for route in routes:
        rules = access_of(route)
        assert len(rules) == 1, f"{route.methods} {route.path} declares {len(rules)} access rules"


def _protected(app: FastAPI) -> list[tuple[str, str, Role]]:
    out = []
    for route in api_routes(app):
        (rule,) = access_of(route)
        if rule.role is not None:
            for method in sorted(route.methods):
                out.append((method, concrete(route.path), rule.role))
    return out


def test_protected_routes_refuse_missing_malformed_unknown_and_revoked_keys(
    app: FastAPI, anon_client: TestClient, make_key: Callable[..., str], state: Runtime
) -> None:
    revoked = make_key(Role.ADMIN, "revoked")
    with state.sessions() as session, session.begin():
        revoke_key(session, key=revoked.split("_")[1])
    protected = _protected(app)
    assert protected
    headers_cases = {
        "missing": {},
        "malformed": {"Authorization": "Basic abc"},
        "unknown": {"Authorization": "Bearer crg_00000000_nope"},
        "revoked": {"Authorization": f"Bearer {revoked}"},
    }
    for method, path, _role in protected:
        for case, headers in headers_cases.items():
            response = anon_client.request(method, path, headers=headers)
            assert response.status_code == 401, (case, method, path, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.headers.get("www-authenticate") == "Bearer"


def test_lower_roles_are_refused_with_403(
    app: FastAPI, anon_client: TestClient, make_key: Callable[..., str]
) -> None:
    keys = {role: make_key(role) for role in Role}
    checked = 0
    for method, path, needed in _protected(app):
        for role in Role:
            if role.allows(needed):
                continue
            response = anon_client.request(
                method, path, headers={"Authorization": f"Bearer {keys[role]}"}
            )
            assert response.status_code == 403, (role, method, path, response.text)
            assert needed.value in response.json()["detail"]
            checked += 1
    if any(needed is not Role.VIEWER for *_, needed in _protected(app)):
        assert checked > 0


def test_public_routes_answer_without_a_key(anon_client: TestClient) -> None:
    assert anon_client.get("/healthz").json() == {"status": "ok"}
    ready = anon_client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "storage": "ok"}
    metrics = anon_client.get("/metrics")
    assert metrics.status_code == 200
    assert "crgate_http_request_seconds" in metrics.text


@pytest.mark.parametrize("role", list(Role))
def test_a_key_of_enough_role_passes(
    anon_client: TestClient, make_key: Callable[..., str], role: Role
) -> None:
    response = anon_client.get(
        "/dicomweb/studies", headers={"Authorization": f"Bearer {make_key(role)}"}
    )
    assert response.status_code in (200, 204), response.text


def test_first_start_writes_admin_key_file_0600(state: Runtime) -> None:
    key_file = state.settings.data_dir / "admin.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_text().startswith("crg_")
