"""crgate in a real browser: Debian's headless chromium, driven by selenium through Debian's
chromium-driver (no browser download), against `crgate serve` started as a process.

Login through the /login page, the cookie reaching protected JSON, CSRF from the page's script,
logout; CORS from pages on an allowed and a disallowed origin; /docs rendering Swagger UI with no
request leaving the server (the browser's network log). Every browser process is gone at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import get_frame
from pydicom.uid import JPEG2000
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

from tests.api.test_stow import STOW_TYPE, multipart
from tests.conftest import free_port
from tests.processes import in_own_session, require_proc, session_processes

pytestmark = pytest.mark.tools

CRGATE = Path(sys.executable).with_name("crgate")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_SECONDS = 60


@dataclass
class Server:
    url: str
    data_dir: Path
    admin_key: str
    allowed_origin: str  # a page server whose origin is in CRGATE_CORS_ORIGINS
    other_origin: str  # a page server whose origin is not


class _Page(BaseHTTPRequestHandler):
    """A blank page: the origin another site's script runs in."""

    def do_GET(self) -> None:
        body = b"<!doctype html><title>another site</title><p>another site</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def page_servers() -> Iterator[tuple[str, str]]:
    servers = [ThreadingHTTPServer(("127.0.0.1", free_port()), _Page) for _ in range(2)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    yield tuple(f"http://127.0.0.1:{s.server_address[1]}" for s in servers)  # type: ignore[misc]
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def server(tmp_path: Path, page_servers: tuple[str, str]) -> Iterator[Server]:
    """`crgate serve` on free ports, a fresh data directory, one allowed CORS origin."""
    allowed, other = page_servers
    data_dir, log = tmp_path / "var", tmp_path / "serve.log"
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRGATE_")}
    env["CRGATE_CORS_ORIGINS"] = allowed
    command = [str(CRGATE), "serve", "--data-dir", str(data_dir), "--http-port", str(http_port)]
    command += ["--dicom-port", str(free_port())]
    url = f"http://127.0.0.1:{http_port}"
    with (
        log.open("wb") as fh,
        in_own_session(command, stdout=fh, stderr=subprocess.STDOUT, env=env) as proc,
    ):
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"crgate serve exited early:\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"no /healthz after 60 s:\n{log.read_text()}"
            time.sleep(0.1)
        key = (data_dir / "admin.key").read_text().strip()
        yield Server(url, data_dir, key, allowed, other)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless chromium with its network log on; chromedriver and every browser process it
    started (in a session of their own) are gone when the test ends, however it ends."""
    require_proc()
    for tool in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(tool), f"{tool} is missing: apt-get install chromium chromium-driver"
    home = tmp_path / "chromium"  # on the command line of every process of this browser
    profile = home / "profile"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    service = Service(
        CHROMEDRIVER,
        log_output=str(tmp_path / "chromedriver.log"),
        # its crash handler leaves the session: XDG_CONFIG_HOME puts `home` on its command line
        env={**os.environ, "XDG_CONFIG_HOME": str(home)},
        popen_kw={"start_new_session": True},
    )
    driver = webdriver.Chrome(service=service, options=options)
    assert service.process is not None
    sid = service.process.pid  # chromedriver leads the session chromium runs in
    try:
        driver.set_page_load_timeout(WAIT_SECONDS)
        driver.set_script_timeout(WAIT_SECONDS)
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            left = _wait_until_gone(sid, str(home), 10)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            assert not left, f"browser processes left after quit: {left}"


def _wait_until_gone(sid: int, marker: str, seconds: float) -> dict[int, str]:
    """The processes of session ``sid`` or naming ``marker`` still alive after ``seconds``."""
    deadline = time.monotonic() + seconds
    while (left := session_processes(sid) | processes_naming(marker)) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    return left


def processes_naming(text: str) -> dict[int, str]:
    """pid -> command line of the live processes whose command line contains ``text``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        cmdline = raw.replace(b"\0", b" ").decode("utf-8", "replace")
        if text in cmdline:
            found[int(entry.name)] = cmdline
    return found


def fetch(driver: webdriver.Chrome, url: str, **init: Any) -> dict[str, Any]:
    """``fetch(url, init)`` in the page: status, headers it may read, body size and text, or the
    error a browser reports."""
    script = """
        const [url, init, done] = arguments;
        fetch(url, init).then(
            async r => {
                const data = await r.arrayBuffer();
                done({status: r.status, size: data.byteLength,
                      body: new TextDecoder().decode(data),
                      headers: Object.fromEntries(r.headers.entries())});
            },
            e => done({error: String(e)}));
    """
    result: dict[str, Any] = driver.execute_async_script(script, url, init)
    return result


def network_requests(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """The requests the page made (URL, method) and their answers' statuses, from the log."""
    requests: dict[str, dict[str, Any]] = {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            request = params["request"]
            requests[params["requestId"]] = {"url": request["url"], "method": request["method"]}
        elif message["method"] == "Network.responseReceived" and params["requestId"] in requests:
            requests[params["requestId"]]["status"] = params["response"]["status"]
    return list(requests.values())


def wait_for(driver: webdriver.Chrome, css: str) -> Any:
    return WebDriverWait(driver, WAIT_SECONDS).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css))
    )


def test_login_page_cookie_csrf_and_logout(server: Server, browser: webdriver.Chrome) -> None:
    browser.get(f"{server.url}/dicomweb/studies")
    assert "missing API key" in browser.find_element(By.TAG_NAME, "body").text

    browser.get(f"{server.url}/login?next=/dicomweb/studies")
    browser.find_element(By.ID, "key").send_keys(server.admin_key)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    WebDriverWait(browser, WAIT_SECONDS).until(lambda d: d.current_url.endswith("/studies"))
    assert browser.find_element(By.TAG_NAME, "body").text.strip() == "[]"  # 200, no studies

    cookies = {c["name"]: c for c in browser.get_cookies()}
    session = cookies["crgate_session"]
    assert session["httpOnly"] is True and session["sameSite"] == "Strict"
    assert session["expiry"] > time.time() + 7 * 3600  # 8 hours by default
    assert cookies["crgate_csrf"]["httpOnly"] is False
    assert server.admin_key not in session["value"]

    # the page's script: reads work with the cookie alone; a change needs the CSRF token
    policy = json.dumps({"modality": "MG", "cr": 12})
    json_post = {"method": "POST", "headers": {"Content-Type": "application/json"}}
    refused = fetch(browser, "/policies", **json_post, body=policy)
    assert refused["status"] == 403 and "X-CSRF-Token" in refused["body"]
    token = browser.execute_script(
        "return document.cookie.split('; ').find(c => c.startsWith('crgate_csrf=')).slice(12)"
    )
    assert "crgate_session" not in browser.execute_script("return document.cookie")  # HttpOnly
    headers = {**json_post["headers"], "X-CSRF-Token": token}
    created = fetch(browser, "/policies", method="POST", headers=headers, body=policy)
    assert created["status"] == 201, created
    listed = fetch(browser, "/policies")
    assert listed["status"] == 200
    assert {"modality": "MG", "cr": 12.0}.items() <= json.loads(listed["body"])[-1].items()

    browser.get(f"{server.url}/login")
    assert "Signed in as" in browser.find_element(By.ID, "who").text
    browser.find_element(By.CSS_SELECTOR, "form[action='/logout'] button").click()
    wait_for(browser, "#key")  # back on the login form
    assert "crgate_session" not in {c["name"] for c in browser.get_cookies()}
    assert fetch(browser, "/dicomweb/studies")["status"] == 401


def test_cors_from_an_allowed_origin_and_a_refused_one(
    server: Server, browser: webdriver.Chrome
) -> None:
    qido = f"{server.url}/dicomweb/studies?limit=101&offset=0&includefield=00081030"
    init = {
        "headers": {"Authorization": f"Bearer {server.admin_key}", "Accept": "application/json"}
    }

    browser.get(server.allowed_origin)
    allowed = fetch(browser, qido, **init)
    assert allowed.get("status") == 200, allowed
    assert json.loads(allowed["body"]) == []
    assert allowed["headers"]["content-type"] == "application/dicom+json"

    browser.get(server.other_origin)
    network_requests(browser)  # drain the log
    refused = fetch(browser, qido, **init)
    assert "error" in refused and "Failed to fetch" in refused["error"], refused
    answered = [r for r in network_requests(browser) if r["url"] == qido and "status" in r]
    assert all(r["status"] != 200 for r in answered), answered  # the GET itself never went

    # the preflight the browser made, replayed header by header
    preflight = httpx.options(
        qido,
        headers={
            "Origin": server.allowed_origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 204
    h = preflight.headers
    assert h["access-control-allow-origin"] == server.allowed_origin
    assert h["access-control-allow-methods"] == "GET, OPTIONS, POST"
    assert h["access-control-allow-headers"] == (
        "Authorization, Accept, Content-Type, Range, If-Range, If-None-Match"
    )
    assert h["access-control-max-age"] == "600"
    assert h["access-control-expose-headers"].startswith(
        "Content-Type, Warning, Location, Content-Location"
    )
    assert h["allow"] == "GET, OPTIONS, POST"
    refused_preflight = httpx.options(
        qido, headers={"Origin": server.other_origin, "Access-Control-Request-Method": "GET"}
    )
    assert refused_preflight.status_code == 403
    assert "access-control-allow-origin" not in refused_preflight.headers


def test_docs_render_swagger_ui_offline(server: Server, browser: webdriver.Chrome) -> None:
    browser.get("about:blank")
    network_requests(browser)  # drain what the browser's own start page loaded
    browser.get(f"{server.url}/docs")
    wait_for(browser, ".swagger-ui .info .title")
    authorize = wait_for(browser, "button.authorize")
    assert "Authorize" in authorize.text
    assert len(browser.find_elements(By.CSS_SELECTOR, ".opblock")) >= 20  # the operations
    browser.get(f"{server.url}/redoc")
    wait_for(browser, ".api-content")
    logo = wait_for(browser, "img[alt='redocly logo']")  # its CDN address rewritten: ours
    assert logo.get_attribute("src") == f"{server.url}/docs/assets/favicon.png"
    requests = network_requests(browser)
    assert any(r["url"].endswith("/openapi.json") for r in requests)
    local = (server.url, f"blob:{server.url}", "data:", "about:blank")
    outside = [r["url"] for r in requests if not r["url"].startswith(local)]
    assert not outside, f"requests left the server: {outside}"
    failed = [r for r in requests if r.get("status", 200) >= 400]
    assert not failed, failed


def test_viewer_style_frame_requests_from_an_allowed_origin(
    server: Server, browser: webdriver.Chrome
) -> None:
    """What OHIF asks, from another origin: the stored J2K codestream, a byte range of it, and the
    headers a viewer must read (exposed to the page's script)."""
    path = Path(str(get_testdata_file("JPEG2000.dcm")))
    original = pydicom.dcmread(path)
    stored = get_frame(original.PixelData, 0, number_of_frames=1)
    bearer = {"Authorization": f"Bearer {server.admin_key}"}
    stow = httpx.post(
        f"{server.url}/dicomweb/studies",
        content=multipart(path.read_bytes()),
        headers={**bearer, "Content-Type": STOW_TYPE},
    )
    assert stow.status_code == 200, stow.text
    frame_url = (
        f"{server.url}/dicomweb/studies/{original.StudyInstanceUID}/series/"
        f"{original.SeriesInstanceUID}/instances/{original.SOPInstanceUID}/frames/1"
    )
    browser.get(server.allowed_origin)
    ohif = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    multi = fetch(browser, frame_url, headers={**bearer, "Accept": ohif})
    assert multi.get("status") == 200, multi
    assert f"transfer-syntax={JPEG2000}" in multi["headers"]["content-type"]
    assert len(stored) < multi["size"] < len(stored) + 400  # the codestream and its framing
    bare = {
        **bearer,
        "Accept": "application/octet-stream; transfer-syntax=*",
        "Range": "bytes=0-99",
    }
    part = fetch(browser, frame_url, headers=bare)
    assert part.get("status") == 206, part
    assert part["headers"]["content-range"] == f"bytes 0-99/{len(stored)}"
    assert part["headers"]["accept-ranges"] == "bytes" and part["size"] == 100
