"""Browser sessions: /login, the cookie, CSRF, revocation, roles; Bearer keys alongside."""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.deps import CSRF_COOKIE, SESSION_COOKIE
from services.core.auth import Role, create_key, revoke_key
from services.core.config import Settings
from services.core.errors import InvalidParameter
from services.core.sessions import SECRET_FILE_NAME, SessionSigner, load_secret
from services.runtime import Runtime, build_runtime

FORM = {"content-type": "application/x-www-form-urlencoded"}
POLICY = {"modality": "MG", "cr": 10}


@pytest.fixture
def browser(app: FastAPI) -> Iterator[TestClient]:
    """A client with no Authorization header: only cookies, like a browser."""
    with TestClient(app, base_url="http://crgate.test") as c:
        yield c


def login(client: TestClient, key: str, next_path: str = "") -> None:
    body = f"key={key}" + (f"&next={next_path}" if next_path else "")
    response = client.post("/login", content=body, headers=FORM, follow_redirects=False)
    assert response.status_code == 303, response.text
    assert response.headers["location"] == (next_path or "/login")


def set_cookie_headers(client: TestClient, key: str) -> dict[str, str]:
    response = client.post("/login", content=f"key={key}", headers=FORM, follow_redirects=False)
    return {h.split("=", 1)[0]: h for h in response.headers.get_list("set-cookie")}


def test_login_sets_httponly_strict_expiring_cookies(browser: TestClient, admin_key: str) -> None:
    cookies = set_cookie_headers(browser, admin_key)
    session, csrf = cookies[SESSION_COOKIE], cookies[CSRF_COOKIE]
    for attribute in ("Max-Age=28800", "Path=/", "SameSite=strict"):
        assert attribute in session and attribute in csrf
    assert "HttpOnly" in session and "HttpOnly" not in csrf  # the page's script reads the CSRF one
    assert admin_key not in session  # the cookie never carries the key


def test_session_reads_like_the_key_and_logout_ends_it(browser: TestClient, admin_key: str) -> None:
    assert browser.get("/dicomweb/studies").status_code == 401
    page = browser.get("/login")
    assert page.status_code == 200 and 'name="key"' in page.text
    login(browser, admin_key, "/dicomweb/studies")
    assert browser.get("/dicomweb/studies").status_code == 200
    assert browser.get("/policies").status_code == 200
    signed_in = browser.get("/login")
    assert "Signed in as" in signed_in.text and "(admin)" in signed_in.text
    csrf = browser.cookies[CSRF_COOKIE]
    assert f'value="{csrf}"' in signed_in.text  # the logout form carries the token
    out = browser.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert SESSION_COOKIE not in browser.cookies
    assert browser.get("/dicomweb/studies").status_code == 401


def test_wrong_key_is_refused_on_the_page(browser: TestClient) -> None:
    response = browser.post("/login", content="key=crg_0000_nope", headers=FORM)
    assert response.status_code == 401
    assert "unknown or revoked API key" in response.text and 'name="key"' in response.text
    assert SESSION_COOKIE not in browser.cookies
    empty = browser.post("/login", content="key=", headers=FORM)
    assert empty.status_code == 401 and "enter an API key" in empty.text


def test_login_redirects_only_to_local_paths(browser: TestClient, admin_key: str) -> None:
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        response = browser.post(
            "/login", content=f"key={admin_key}&next={target}", headers=FORM, follow_redirects=False
        )
        assert response.headers["location"] == "/login", target


def test_login_from_another_origin_is_refused(browser: TestClient, admin_key: str) -> None:
    response = browser.post(
        "/login",
        content=f"key={admin_key}",
        headers={**FORM, "Origin": "http://evil.example"},
        follow_redirects=False,
    )
    assert response.status_code == 403
    assert SESSION_COOKIE not in browser.cookies


def test_state_changing_requests_need_the_csrf_token(browser: TestClient, admin_key: str) -> None:
    login(browser, admin_key)
    missing = browser.post("/policies", json=POLICY)
    assert missing.status_code == 403 and "X-CSRF-Token" in missing.json()["detail"]
    for bad in (b"x" * 43, "\u00e9".encode() * 22):  # bytes: httpx would refuse non-ASCII
        wrong = browser.post("/policies", json=POLICY, headers={"X-CSRF-Token": bad})
        assert wrong.status_code == 403, bad
    token = {"X-CSRF-Token": browser.cookies[CSRF_COOKIE]}
    cross = browser.post("/policies", json=POLICY, headers={**token, "Origin": "http://evil.test"})
    assert cross.status_code == 403 and "cross-origin" in cross.json()["detail"]
    same = browser.post("/policies", json=POLICY, headers={**token, "Origin": "http://crgate.test"})
    assert same.status_code == 201, same.text
    assert browser.get("/policies").status_code == 200  # reads need no token
    logout = browser.post("/logout", follow_redirects=False)  # no token: refused
    assert logout.status_code == 403
    assert browser.get("/policies").status_code == 200


def test_roles_apply_to_sessions_as_to_keys(
    browser: TestClient, make_key: Callable[[Role], str]
) -> None:
    login(browser, make_key(Role.VIEWER))
    assert browser.get("/dicomweb/studies").status_code == 200
    token = {"X-CSRF-Token": browser.cookies[CSRF_COOKIE]}
    denied = browser.post("/policies", json=POLICY, headers=token)
    assert denied.status_code == 403 and "needs the admin role" in denied.json()["detail"]
    assert "(viewer)" in browser.get("/login").text


def test_revoking_the_key_ends_its_sessions(
    browser: TestClient, state: Runtime, make_key: Callable[[Role], str]
) -> None:
    key = make_key(Role.OPERATOR)
    login(browser, key)
    assert browser.get("/dicomweb/studies").status_code == 200
    with state.sessions() as session, session.begin():
        revoke_key(session, key=key.split("_")[1])
    response = browser.get("/dicomweb/studies")
    assert response.status_code == 401 and "log in again" in response.json()["detail"]
    assert 'name="key"' in browser.get("/login").text  # the page offers the form again


def test_forged_or_altered_cookies_are_refused(browser: TestClient, admin_key: str) -> None:
    login(browser, admin_key)
    token = browser.cookies[SESSION_COOKIE]
    key_id, expires, nonce, mac = token.split(".")
    browser.cookies.clear()
    for forged in (
        f"{key_id}.{int(expires) + 3600}.{nonce}.{mac}",  # a later expiry
        f"{int(key_id) + 1}.{expires}.{nonce}.{mac}",  # another key
        f"{2**40}.{expires}.{nonce}.{mac}",  # beyond any row id
        f"{key_id}.{expires}.{nonce}.{mac[:-1]}\u00e9",  # not ASCII
        "\u00b2.1.x.y",  # a digit Python knows, int() does not
        "garbage",
    ):
        cookie = f"{SESSION_COOKIE}={forged}".encode()  # bytes: httpx would refuse non-ASCII
        assert browser.get("/dicomweb/studies", headers={"Cookie": cookie}).status_code == 401


def test_bearer_keys_keep_working_and_win_over_a_cookie(
    browser: TestClient, admin_key: str, make_key: Callable[[Role], str]
) -> None:
    login(browser, admin_key)
    viewer = {"Authorization": f"Bearer {make_key(Role.VIEWER)}"}
    assert browser.get("/dicomweb/studies", headers=viewer).status_code == 200
    # the header decides: a viewer key is refused an admin route despite the admin's cookie
    assert browser.post("/policies", json=POLICY, headers=viewer).status_code == 403


def test_signer_expiry_and_key_binding(state: Runtime) -> None:
    signer = SessionSigner(b"s" * 32, 60)
    with state.sessions() as session, session.begin():
        row, _token = create_key(session, name="expiry", role=Role.VIEWER)
        issued = signer.issue(session, row.id, now=1000.0)
        assert issued.expires == 1060
        verified = signer.verify(session, issued.token, now=1059.0)
        assert verified is not None and verified.principal.role is Role.VIEWER
        assert verified.csrf == issued.csrf
        assert signer.verify(session, issued.token, now=1060.0) is None  # expired
        assert SessionSigner(b"t" * 32, 60).verify(session, issued.token, now=1001.0) is None


def test_session_secret_file_and_configured_secret(tmp_path: Path) -> None:
    first = load_secret("", tmp_path)
    path = tmp_path / SECRET_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(first) == 64
    assert load_secret("", tmp_path) == first  # a second process reads the same secret
    assert load_secret("c" * 32, tmp_path) == b"c" * 32
    with pytest.raises(InvalidParameter, match="at least 32"):
        load_secret("short", tmp_path)


def test_a_stale_cookie_falls_back_to_anonymous_read_when_enabled(
    tmp_path: Path, database_url: str
) -> None:
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, anonymous_read=True)
    state = build_runtime(settings, create=True)
    try:
        with TestClient(create_app(state=state), base_url="http://crgate.test") as browser:
            browser.cookies.set(SESSION_COOKIE, "1.1.x.y", domain="crgate.test")
            assert browser.get("/dicomweb/studies").status_code == 200  # anonymous viewer
            assert browser.get("/policies").status_code == 401  # not a DICOMweb read
    finally:
        state.close()
