"""The web console (/ui) in-process: login redirects, each page for each role, the study page's
images rendered at the asked size, and the JSON routes the console added (jobs, keys, sweeps)."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from services.core.auth import Role
from services.runtime import Runtime

PAGES = ["studies", "jobs", "policies", "sweeps", "destinations", "audit", "keys"]
NEEDS = {"studies": Role.VIEWER, "jobs": Role.VIEWER, "policies": Role.OPERATOR,
         "sweeps": Role.OPERATOR, "destinations": Role.ADMIN, "audit": Role.ADMIN,
         "keys": Role.ADMIN}  # fmt: skip


def signed_in(app: FastAPI, key: str) -> TestClient:
    """A browser-like client: logged in through /login, the cookies kept."""
    client = TestClient(app, follow_redirects=False)
    client.__enter__()  # the lifespan: the runtime and the session signer
    response = client.post("/login", data={"key": key, "next": "/ui"})
    assert response.status_code == 303, response.text
    return client


@pytest.fixture
def browser_as(
    app: FastAPI, make_key: Callable[..., str]
) -> Iterator[Callable[[Role], TestClient]]:
    clients: list[TestClient] = []

    def make(role: Role) -> TestClient:
        client = signed_in(app, make_key(role))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def csrf(client: TestClient) -> dict[str, str]:
    return {"X-CSRF-Token": client.cookies["crgate_csrf"]}


def external_urls(html: str) -> list[str]:
    """src/href/action values that point at another host."""
    found = re.findall(r'(?:src|href|action)\s*=\s*"([^"]*)"', html)
    return [u for u in found if re.match(r"^(?:[a-z]+:)?//", u, re.I)]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def test_not_signed_in_goes_to_login_with_next(anon_client: TestClient) -> None:
    root = anon_client.get("/", follow_redirects=False)
    assert root.status_code == 303 and root.headers["location"] == "/ui/studies"
    assert anon_client.get("/ui", follow_redirects=False).headers["location"] == "/ui/studies"
    for name in PAGES:
        response = anon_client.get(f"/ui/{name}?page=1", follow_redirects=False)
        assert response.status_code == 303, name
        assert response.headers["location"] == f"/login?next=/ui/{name}%3Fpage%3D1"
    # a forged cookie is no session either
    anon_client.cookies.set("crgate_session", "1.99999999999.x.y")
    assert anon_client.get("/ui/studies", follow_redirects=False).status_code == 303
    # and the images are API answers: 401 problem JSON, not a redirect
    image = anon_client.get(f"/ui/render/{'1.2.3'}.png")
    assert image.status_code == 401 and image.json()["detail"]


@pytest.mark.parametrize("role", list(Role))
def test_each_page_for_each_role(role: Role, browser_as: Callable[[Role], TestClient]) -> None:
    client = browser_as(role)
    for name in PAGES:
        response = client.get(f"/ui/{name}")
        html = response.text
        assert response.headers["content-type"].startswith("text/html")
        assert external_urls(html) == [], name
        assert "Traceback" not in html
        if role.allows(NEEDS[name]):
            assert response.status_code == 200, (name, html)
            assert f'href="/ui/{name}" aria-current="page"' in html
        else:
            assert response.status_code == 403, name
            assert f"this needs the {NEEDS[name].value} role" in html
            assert f'href="/ui/{name}"' not in html  # not offered in the navigation
    if role.allows(Role.OPERATOR):
        page = client.get("/ui/policies").text
        editable = 'class="policy-edit policy-form"' in page and 'id="new-policy"' in page
        assert editable is (role is Role.ADMIN)  # read-only for an operator
    assert client.get("/ui/static/console.css").headers["content-type"].startswith("text/css")
    assert client.get("/ui/static/viewer.js").status_code == 200
    assert client.get("/ui/static/nothing.js").status_code == 404
    assert client.get("/ui/static/..%2Fpages.py").status_code in (404, 422)


def test_studies_search_and_what_arrived(
    browser_as: Callable[[Role], TestClient], mg_study: str, state: Runtime
) -> None:
    client = browser_as(Role.VIEWER)
    page = client.get("/ui/studies").text
    assert f'href="/ui/studies/{mg_study}"' in page
    assert "MG: 1 series, 4 images" in page and "0 results" in page
    assert "1 study" in page
    assert mg_study not in client.get("/ui/studies", params={"modality": "CT"}).text
    assert mg_study in client.get("/ui/studies", params={"modality": "MG"}).text
    assert mg_study not in client.get("/ui/studies", params={"patient_id": "nobody*"}).text
    assert mg_study not in client.get("/ui/studies", params={"date_from": "2999-01-01"}).text
    with state.sessions() as session:
        from services.core.db.tables import Study

        study = session.get(Study, mg_study)
        assert study is not None
        pid = study.patient_id or ""
    assert mg_study in client.get("/ui/studies", params={"patient_id": pid[:3] + "*"}).text


def test_study_page_shows_four_panes_and_figures(
    browser_as: Callable[[Role], TestClient], client: TestClient, mg_study: str
) -> None:
    made = client.post(f"/studies/{mg_study}/classify", params={"cr": 25, "wait": 120})
    assert made.status_code == 200, made.text
    result = made.json()["result"]
    viewer = browser_as(Role.VIEWER)
    html = viewer.get(f"/ui/studies/{mg_study}").text
    assert external_urls(html) == []
    assert html.count('<article class="image"') == 4
    assert 'id="classify"' not in html and "needs the operator role" in html  # a viewer
    image = result["images"][0]
    assert f"{image['achieved_cr']:.2f}" in html and f"{image['psnr_db']:.2f}" in html
    breast = result["breasts"][0]
    assert f"{breast['probability']:.4f}" in html and f"{breast['change']:+.4f}" in html
    sop, copy = image["input_sop_instance_uid"], image["output_sop_instance_uid"]
    rid = result["result_id"]
    for url in (
        f"/ui/render/{sop}.png",
        f"/ui/render/{copy}.png?result={rid}",
        f"/ui/difference/{rid}/{sop}.png",
        f"/studies/{mg_study}/results/{rid}/overlays/{sop}.png",
    ):
        assert url in html.replace("&amp;", "&"), url
    original = viewer.get(f"/ui/render/{sop}.png", params={"viewport": "200,200"})
    assert original.status_code == 200 and png_size(original.content) == (162, 200)  # 416x512
    copy_png = viewer.get(f"/ui/render/{copy}.png", params={"viewport": "200,200"})
    assert copy_png.status_code == 200 and png_size(copy_png.content) == (162, 200)
    crop = viewer.get(f"/ui/render/{sop}.png", params={"viewport": "100,100,0,0,50,50"})
    assert png_size(crop.content) == (100, 100)
    windowed = viewer.get(
        f"/ui/render/{sop}.png", params={"viewport": "200,200", "window": "100,50"}
    )
    assert windowed.status_code == 200 and windowed.content != original.content
    diff = viewer.get(f"/ui/difference/{rid}/{sop}.png", params={"viewport": "208,256"})
    assert diff.status_code == 200 and png_size(diff.content) == (208, 256)
    pixels = np.asarray(Image.open(io.BytesIO(diff.content)))
    assert pixels.max() == 255 and pixels.min() == 0  # block maxima keep the largest error
    full = viewer.get(f"/ui/difference/{rid}/{sop}.png")
    assert png_size(full.content) == (416, 512)

    bad = viewer.get(f"/ui/render/{sop}.png", params={"viewport": "0,10"})
    assert bad.status_code == 422 and "viewport" in bad.json()["detail"]
    gone = viewer.get("/ui/render/1.2.3.4.png")
    assert gone.status_code == 404 and "not stored" in gone.json()["detail"]
    other = viewer.get(f"/ui/studies/{mg_study}", params={"result": "nope"})
    assert other.status_code == 404 and "no result" in other.text
    missing = viewer.get("/ui/studies/1.2.3.4")
    assert missing.status_code == 404 and "not stored here" in missing.text
    malformed = viewer.get("/ui/studies/not-a-uid")
    assert malformed.status_code == 422 and "Traceback" not in malformed.text

    operator = browser_as(Role.OPERATOR)
    page = operator.get(f"/ui/studies/{mg_study}").text
    assert 'id="classify"' in page and 'name="csrf-token" content="' in page
    # the form's request: the JSON API with the session's CSRF token
    refused = operator.post(f"/studies/{mg_study}/classify", params={"cr": 10})
    assert refused.status_code == 403
    again = operator.post(
        f"/studies/{mg_study}/classify", params={"cr": 10, "wait": 120}, headers=csrf(operator)
    )
    assert again.status_code == 200, again.text
    page = operator.get(f"/ui/studies/{mg_study}").text
    assert "CR 10</a>" in page and "CR 25</a>" in page and 'id="cr-slider"' in page

    listed = viewer.get("/jobs").json()
    assert listed["total"] == 2 and {j["cr"] for j in listed["items"]} == {10, 25}
    assert viewer.get("/jobs", params={"status": "failed"}).json()["items"] == []
    assert viewer.get("/jobs", params={"study_uid": "1.2.3"}).json()["total"] == 0
    wrong = viewer.get("/jobs", params={"status": "lost"})
    assert wrong.status_code == 422 and "succeeded" in wrong.json()["detail"]
    jobs_page = viewer.get("/ui/jobs").text
    assert jobs_page.count("data-job=") == 2 and "succeeded" in jobs_page


def test_keys_created_once_revoked_and_audited(browser_as: Callable[[Role], TestClient]) -> None:
    admin = browser_as(Role.ADMIN)
    assert admin.post("/keys", json={"name": "x"}).status_code == 403  # no CSRF token
    made = admin.post("/keys", json={"name": "PACS bridge", "role": "operator"},
                      headers=csrf(admin))  # fmt: skip
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["key"].startswith(f"crg_{body['prefix']}_") and body["role"] == "operator"
    listed = admin.get("/keys").json()
    assert next(k for k in listed if k["id"] == body["id"]).keys() == body.keys() - {"key"}
    assert body["key"] not in admin.get("/ui/keys").text  # shown once, never again
    assert admin.post("/keys", json={"name": "y", "role": "god"},
                      headers=csrf(admin)).status_code == 422  # fmt: skip
    revoked = admin.delete(f"/keys/{body['id']}", headers=csrf(admin))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert admin.delete("/keys/nope", headers=csrf(admin)).status_code == 404
    audit_page = admin.get("/ui/audit", params={"entity": "key"}).text
    assert "revoke" in audit_page and "PACS bridge" in audit_page
    assert admin.get("/ui/audit", params={"since": "yesterday"}).status_code == 422
    assert admin.get("/ui/audit", params={"entity": "nothing"}).status_code == 422
    assert admin.get("/sweeps").json() == []


def test_presets_preview_then_apply(browser_as: Callable[[Role], TestClient]) -> None:
    from services.core.policies import load_presets

    admin = browser_as(Role.ADMIN)
    name = next(iter(load_presets()))
    page = admin.get("/ui/policies").text
    assert f'data-preset="{name}"' in page and "creates it at CR" in page
    applied = admin.post(f"/policies/presets/{name}", headers=csrf(admin))
    assert applied.status_code == 200, applied.text
    page = admin.get("/ui/policies").text
    assert f"{name}: 0 change(s)" in page
    operator_page = browser_as(Role.OPERATOR).get("/ui/policies").text
    assert "Read-only" in operator_page and "data-preset=" not in operator_page


def test_a_compress_result_has_no_saliency_pane(
    browser_as: Callable[[Role], TestClient], client: TestClient, mg_study: str
) -> None:
    made = client.post(f"/studies/{mg_study}/compress", params={"cr": 10, "wait": 120})
    assert made.status_code == 200, made.text
    result = made.json()["jobs"][0]["result"]
    viewer = browser_as(Role.VIEWER)
    html = viewer.get(f"/ui/studies/{mg_study}").text
    assert "compress at CR 10" in html and html.count('<article class="image"') == 4
    assert 'data-kind="overlay"' not in html and "Per breast" not in html
    image = result["images"][0]
    diff = viewer.get(
        f"/ui/difference/{result['result_id']}/{image['input_sop_instance_uid']}.png",
        params={"viewport": "100,100", "scale": "5"},
    )
    assert diff.status_code == 200 and png_size(diff.content) == (81, 100)


def test_destinations_page_lists_them_with_an_echo_button(
    browser_as: Callable[[Role], TestClient],
) -> None:
    admin = browser_as(Role.ADMIN)
    spec = {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 11113}
    made = admin.post("/destinations", json=spec, headers=csrf(admin))
    assert made.status_code == 201, made.text
    page = admin.get("/ui/destinations").text
    assert "archive" in page and "127.0.0.1:11113" in page
    assert f'data-echo="{made.json()["id"]}"' in page
    # the kept-copy lookup takes only a result crgate knows (no path from the query)
    assert admin.get("/ui/render/1.2.3.png", params={"result": "../../x"}).status_code == 404
