"""/policies and /audit over HTTP, on SQLite and PostgreSQL (``client`` carries an admin key)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from services.api.problems import status_of
from services.core.auth import Role
from services.core.errors import InvalidParameter

PROBLEM = "application/problem+json"
FIRST_ADMIN = "first admin (admin.key)"


def _policies(client: TestClient) -> list[dict[str, Any]]:
    response = client.get("/policies")
    assert response.status_code == 200, response.text
    result: list[dict[str, Any]] = response.json()
    return result


def _find(client: TestClient, modality: str, body_part: str = "*") -> dict[str, Any]:
    for p in _policies(client):
        if p["modality"] == modality and p["body_part"] == body_part:
            return p
    raise AssertionError(f"no policy {modality}/{body_part}")


def _audit(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    response = client.get("/audit", params=params)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def test_default_policy_exists_at_start(client: TestClient) -> None:
    (default,) = _policies(client)
    assert default["default"] is True
    assert (default["modality"], default["body_part"], default["pediatric"]) == ("*", "*", None)
    assert (default["cr"], default["syntax"], default["max_cr"]) == (25, "j2k", None)
    assert default["source"] == f"policy {default['id']} (default)"
    assert default["created_at"].endswith(("Z", "+00:00"))
    (entry,) = _audit(client, entity="policy")
    assert (entry["actor"], entry["action"], entry["entity"]) == ("system", "create", "policy")
    (key,) = _audit(client, entity="key")  # the first admin key, created at start
    assert (key["actor"], key["action"], key["after"]["role"]) == ("system", "create", "admin")


def test_create_read_update_delete(client: TestClient) -> None:
    body = {"modality": "mg", "body_part": "breast", "pediatric": False, "cr": 12}
    created = client.post("/policies", json=body)
    assert created.status_code == 201, created.text
    p = created.json()
    assert (p["modality"], p["body_part"], p["pediatric"]) == ("MG", "BREAST", False)
    assert (p["cr"], p["syntax"], p["auto_classify"], p["quiet_seconds"]) == (12, "j2k", False, 120)
    assert p["source"] == f"policy {p['id']} (MG/BREAST/adult)"
    assert client.get(f"/policies/{p['id']}").json() == p

    changed = client.put(
        f"/policies/{p['id']}",
        json={"auto_classify": True, "expected_instances": 4, "quiet_seconds": 60},
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["cr"] == 12  # left out: kept
    assert (changed.json()["auto_classify"], changed.json()["expected_instances"]) == (True, 4)
    cleared = client.put(f"/policies/{p['id']}", json={"expected_instances": None, "cr": 1})
    assert (cleared.json()["expected_instances"], cleared.json()["syntax"]) == (
        None,
        "j2k-lossless",
    )

    deleted = client.delete(f"/policies/{p['id']}")
    assert deleted.status_code == 204 and deleted.content == b""
    missing = client.get(f"/policies/{p['id']}")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith(PROBLEM)
    assert f"no policy with id {p['id']}" in missing.json()["detail"]

    actions = [(e["action"], e["actor"]) for e in _audit(client, entity="policy")]
    assert actions[:4] == [
        ("delete", FIRST_ADMIN),
        ("update", FIRST_ADMIN),
        ("update", FIRST_ADMIN),
        ("create", FIRST_ADMIN),
    ]
    latest = _audit(client, limit=1)[0]
    assert latest["before"]["cr"] == 1 and latest["after"] is None


def test_duplicate_and_default_deletion_are_conflicts(client: TestClient) -> None:
    assert client.post("/policies", json={"modality": "US", "cr": 10}).status_code == 201
    again = client.post("/policies", json={"modality": "us", "body_part": "*", "cr": 8})
    assert again.status_code == 409
    assert again.headers["content-type"].startswith(PROBLEM)
    assert "US/* exists already" in again.json()["detail"]
    default = next(p for p in _policies(client) if p["default"])
    refused = client.delete(f"/policies/{default['id']}")
    assert refused.status_code == 409 and "cannot be deleted" in refused.json()["detail"]


def test_invalid_bodies_are_problems(client: TestClient) -> None:
    invalid = status_of(InvalidParameter("x"))  # the edge's mapping for a bad parameter
    cases = [
        ({"modality": "MG", "cr": 0}, invalid, "out of range"),
        ({"modality": "MG", "cr": 20, "syntax": "j2k-lossless"}, invalid, "cannot give CR 20"),
        ({"modality": "CR DX", "cr": 20}, invalid, "not a DICOM code"),
        ({"modality": "SC", "cr": 20}, invalid, "not a Modality defined term of DICOM PS3.3"),
        (
            {"modality": "CT", "body_part": "skeletal", "cr": 20},
            invalid,
            "'SKELETAL' is not a Body Part Examined defined term of DICOM PS3.16 Annex L",
        ),
        ({"modality": "MG", "cr": 20, "syntax": "jpeg"}, 422, "syntax"),
        ({"modality": "MG", "cr": 20, "quiet_seconds": -1}, 422, "quiet_seconds"),
        ({"cr": 20}, 422, "modality"),
    ]
    for body, status, words in cases:
        response = client.post("/policies", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.headers["content-type"].startswith(PROBLEM)
        assert words in response.json()["detail"], (body, response.json())
    assert len(_policies(client)) == 1


def test_presets_list_and_apply(client: TestClient) -> None:
    presets = client.get("/policies/presets")
    assert presets.status_code == 200
    by_name = {p["name"]: p for p in presets.json()}
    assert set(by_name) == {"CAR", "DRG", "RCR"}
    chest = by_name["RCR"]["rows"][0]
    assert chest["modalities"] == ["CR", "DX"]
    assert chest["body_parts"] == ["*"]  # chest, skeletal and body: all adult radiography
    assert (chest["pediatric"], chest["max_cr"]) == (False, 10)

    applied = client.post("/policies/presets/RCR")
    assert applied.status_code == 200, applied.text
    result = applied.json()
    assert len(result["created"]) == by_name["RCR"]["policy_count"] == 14
    mg = next(p for p in result["policies"] if p["modality"] == "MG")
    assert (mg["cr"], mg["max_cr"], mg["max_cr_preset"], mg["preset"]) == (20, 20, "RCR", "RCR")
    assert mg["expected_instances"] == 4
    assert mg["source"] == f"policy {mg['id']} (MG/BREAST, preset RCR)"

    again = client.post("/policies/presets/rcr").json()
    assert again["created"] == [] and again["updated"] == []
    assert sorted(again["unchanged"]) == sorted(result["created"])
    assert len(_audit(client, entity="policy", limit=1000)) == 1 + 14

    unknown = client.post("/policies/presets/ACR")
    assert unknown.status_code == 404
    assert "choose one of CAR, DRG, RCR" in unknown.json()["detail"]


def test_cr_above_the_maximum_needs_an_override_reason(client: TestClient) -> None:
    client.post("/policies/presets/RCR")
    mg = _find(client, "MG", "BREAST")
    refused = client.put(f"/policies/{mg['id']}", json={"cr": 30})
    assert refused.status_code == 422
    assert refused.headers["content-type"].startswith(PROBLEM)
    problem = refused.json()
    assert "above the maximum 20 set by preset RCR" in problem["detail"]
    assert (problem["max_cr"], problem["preset"], problem["cr"]) == (20, "RCR", 30)
    assert client.get(f"/policies/{mg['id']}").json()["cr"] == 20  # nothing changed
    blank = client.put(f"/policies/{mg['id']}", json={"cr": 30, "override_reason": " "})
    assert blank.status_code == 422

    allowed = client.put(
        f"/policies/{mg['id']}", json={"cr": 30, "override_reason": "reader study, signed off"}
    )
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["override_reason"] == "reader study, signed off"
    entry = _audit(client, limit=1)[0]
    assert entry["reason"] == "reader study, signed off"
    assert (entry["before"]["cr"], entry["after"]["cr"]) == (20, 30)

    # a new MG policy inherits the maximum of the preset applied to MG
    child = client.post("/policies", json={"modality": "MG", "pediatric": True, "cr": 25})
    assert child.status_code == 422 and child.json()["max_cr"] == 20


def test_resolve_shows_the_policy_that_applies(client: TestClient) -> None:
    client.post("/policies/presets/RCR")
    found = client.get("/policies/resolve", params={"modality": "MG", "body_part": "breast"})
    assert found.status_code == 200, found.text
    assert (found.json()["cr"], found.json()["syntax"]) == (20, "j2k")
    assert found.json()["source"].endswith("(MG/BREAST, preset RCR)")
    fallback = client.get("/policies/resolve", params={"modality": "CT", "pediatric": True})
    assert fallback.json()["source"].endswith("(default)")
    # what studies carry is resolved, never refused: only new policies name defined terms
    odd = client.get("/policies/resolve", params={"modality": "SC", "body_part": "SKELETAL"})
    assert odd.status_code == 200 and odd.json()["source"].endswith("(default)")


def test_audit_pages_newest_first(client: TestClient) -> None:
    for modality in ("US", "NM", "XA"):
        client.post("/policies", json={"modality": modality, "cr": 10})
    page = client.get("/audit", params={"limit": 2, "offset": 1, "entity": "policy"}).json()
    assert (page["total"], page["limit"], page["offset"]) == (4, 2, 1)
    assert [e["after"]["modality"] for e in page["items"]] == ["NM", "US"]
    assert client.get("/audit", params={"entity": "job"}).json()["total"] == 0
    assert client.get("/audit", params={"limit": 0}).status_code == 422


def test_actor_is_the_key_name_and_roles_are_enforced(
    anon_client: TestClient, make_key: Callable[..., str]
) -> None:
    def as_(role: Role, name: str = "test") -> dict[str, str]:
        return {"Authorization": f"Bearer {make_key(role, name)}"}

    admin, operator, viewer = as_(Role.ADMIN, "alice"), as_(Role.OPERATOR), as_(Role.VIEWER)
    made = anon_client.post("/policies", json={"modality": "US", "cr": 9}, headers=admin)
    assert made.status_code == 201
    assert _audit_as(anon_client, admin)[0]["actor"] == "alice-admin"

    assert anon_client.get("/policies", headers=operator).status_code == 200
    assert anon_client.get("/policies/presets", headers=operator).status_code == 200
    assert anon_client.get("/policies/resolve", headers=operator).status_code == 200
    for method, path in [
        ("POST", "/policies"),
        ("PUT", f"/policies/{made.json()['id']}"),
        ("DELETE", f"/policies/{made.json()['id']}"),
        ("POST", "/policies/presets/RCR"),
        ("GET", "/audit"),
    ]:
        response = anon_client.request(method, path, headers=operator, json={})
        assert response.status_code == 403, (method, path, response.text)
    assert anon_client.get("/policies", headers=viewer).status_code == 403
    assert anon_client.get("/policies").status_code == 401
    assert len(_audit_as(anon_client, admin)) == 2  # the default and alice's; no refused change


def _audit_as(client: TestClient, headers: dict[str, str]) -> list[dict[str, Any]]:
    response = client.get("/audit", headers=headers, params={"entity": "policy"})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def test_openapi_documents_the_fields(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    fields = schemas["PolicyIn"]["properties"]
    for name in ("modality", "body_part", "pediatric", "cr", "syntax", "override_reason"):
        assert fields[name].get("description"), name
    assert "/policies/presets/{name}" in client.get("/openapi.json").json()["paths"]


def test_preset_over_http_keeps_stricter_values_and_lists_violations(client: TestClient) -> None:
    strict = client.post("/policies", json={"modality": "CT", "pediatric": True, "cr": 4})
    loose = client.post("/policies", json={"modality": "MG", "body_part": "*", "cr": 40})
    assert strict.status_code == loose.status_code == 201, loose.text
    applied = client.post("/policies/presets/CAR")
    assert applied.status_code == 200, applied.text
    body = applied.json()
    (skipped,) = [s for s in body["skipped"] if s["policy_id"] == strict.json()["id"]]
    assert (skipped["cr"], skipped["preset_cr"]) == (4, 15) and "force" in skipped["reason"]
    assert any(f"policy {loose.json()['id']} (MG/*)" in v for v in body["violations"])
    listed = {p["id"]: p for p in _policies(client)}
    assert "above the maximum 25 of preset CAR" in listed[loose.json()["id"]]["violation"]
    assert listed[strict.json()["id"]]["violation"] is None
    assert listed[strict.json()["id"]]["cr"] == 4
    ready = client.get("/readyz").json()
    assert ready["policy_violations"] == 1
    fixed = client.put(
        f"/policies/{loose.json()['id']}", json={"override_reason": "research protocol 7"}
    )
    assert fixed.status_code == 200 and fixed.json()["violation"] is None
    assert client.get("/readyz").json()["policy_violations"] == 0
    forced = client.post("/policies/presets/CAR", params={"force": True}).json()
    assert strict.json()["id"] in forced["updated"] and forced["skipped"] == []


def test_audit_filters_by_a_known_entity_and_time(client: TestClient) -> None:
    assert client.post("/policies", json={"modality": "CT", "cr": 8}).status_code == 201
    unknown = client.get("/audit", params={"entity": "studies"})
    assert (
        unknown.status_code in (400, 422)
        and "use one of destination, forward, instance, job, key, policy" in unknown.text
    )
    assert _audit(client, entity="policy", since="2999-01-01T00:00:00") == []
    assert [e["entity"] for e in _audit(client, entity="policy", since="2000-01-01")]
