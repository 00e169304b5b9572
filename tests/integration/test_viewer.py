"""OHIF Viewer v3 served by `crgate serve --viewer` under /viewer/, in Debian's headless chromium:
the session cookie from /login is all it needs; it lists the study, opens it and draws the
original series and crgate's JPEG 2000 copy, and none of the requests it made failed.

The viewer is `make viewer`'s build/ohif/dist (the prebuilt @ohif/app from the npm registry).
"""

from __future__ import annotations

import io
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from tests.api.test_compress import mixed_study
from tests.api.test_stow import STOW_TYPE, multipart
from tests.conftest import free_port
from tests.integration.test_browser import CRGATE, WAIT_SECONDS, network_requests
from tests.integration.test_console_browser import screenshot
from tests.processes import in_own_session

pytestmark = pytest.mark.tools

DIST = Path(__file__).resolve().parents[2] / "build" / "ohif" / "dist"


@pytest.fixture
def viewer_server(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """`crgate serve --viewer build/ohif/dist`: (url, admin key, log)."""
    assert (DIST / "index.html").is_file(), "run `make viewer` (the test command does)"
    data_dir, log = tmp_path / "var", tmp_path / "serve.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRGATE_")}
    command = [str(CRGATE), "serve", "--data-dir", str(data_dir), "--http-port", str(port)]
    command += ["--dicom-port", str(free_port()), "--viewer", str(DIST)]
    url = f"http://127.0.0.1:{port}"
    with (
        log.open("wb") as fh,
        in_own_session(command, stdout=fh, stderr=subprocess.STDOUT, env=env) as proc,
    ):
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield url, (data_dir / "admin.key").read_text().strip(), log


def store_compressed_ct(url: str, key: str, folder: Path, syntax: str = "j2k") -> tuple[str, str]:
    """The mixed study's CT slices by STOW-RS, then compressed at CR 10: (study UID, the
    Series Instance UID of crgate's JPEG 2000 copy)."""
    study_uid, paths = mixed_study(folder)
    ct = [p.read_bytes() for p in paths[:3]]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": STOW_TYPE}
    stored = httpx.post(f"{url}/dicomweb/studies", content=multipart(*ct), headers=headers)
    assert stored.status_code == 200, stored.text
    done = httpx.post(
        f"{url}/studies/{study_uid}/compress",
        params={"cr": 10, "syntax": syntax, "wait": 120},
        headers={"Authorization": f"Bearer {key}"},
        timeout=150,
    )
    assert done.status_code == 200, done.text
    (entry,) = done.json()["jobs"]
    (copy_series,) = {r["series_uid"] for r in entry["result"]["outputs"]["derived"]}
    return study_uid, copy_series


def settled(driver: webdriver.Chrome) -> WebDriverWait[webdriver.Chrome]:
    """A wait that tolerates elements replaced while the viewer re-renders."""
    return WebDriverWait(driver, WAIT_SECONDS, ignored_exceptions=(StaleElementReferenceException,))


def log_in(driver: webdriver.Chrome, url: str, key: str, then: str) -> None:
    driver.get(f"{url}/login?next={then}")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()


def drawn_canvases(driver: webdriver.Chrome) -> list[float]:
    """The standard deviation of the pixels of each viewport canvas on the screen (a blank
    or black canvas is 0)."""
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("L")
    spreads = []
    for canvas in driver.find_elements(By.CSS_SELECTOR, "canvas.cornerstone-canvas"):
        box = canvas.rect
        if box["width"] < 32 or box["height"] < 32:
            continue
        crop = shot.crop(
            (
                int(box["x"]),
                int(box["y"]),
                int(box["x"] + box["width"]),
                int(box["y"] + box["height"]),
            )
        )
        spreads.append(float(np.asarray(crop, dtype=np.float64).std()))
    return spreads


@pytest.mark.parametrize(("syntax", "title"), [("j2k", "JPEG 2000"), ("htj2k", "HTJ2K")])
def test_ohif_lists_opens_and_draws_the_original_and_the_copy(
    viewer_server: tuple[str, str, Path],
    browser: webdriver.Chrome,
    tmp_path: Path,
    syntax: str,
    title: str,
) -> None:
    """The copy in JPEG 2000 and in HTJ2K: OHIF asks for frames with transfer-syntax=*, gets
    the codestream as stored and decodes it with its own decoders."""
    url, key, _log = viewer_server
    study_uid, copy_series = store_compressed_ct(url, key, tmp_path / "in", syntax)

    browser.get(f"{url}/viewer/")  # no session: to the login page, and back after it
    assert "/login?next=" in browser.current_url
    log_in(browser, url, key, "/viewer/")
    WebDriverWait(browser, WAIT_SECONDS).until(lambda d: "Compress, Test" in d.page_source)
    assert browser.current_url.startswith(f"{url}/viewer/")  # the study list shows the study
    log = RequestLog()

    browser.get(f"{url}/viewer/viewer?StudyInstanceUIDs={study_uid}")
    settled(browser).until(lambda d: any(s > 5 for s in drawn_canvases(d)))
    # the study browser offers the original CT series and crgate's JPEG 2000 copy: open the copy
    copy = WebDriverWait(browser, WAIT_SECONDS).until(
        lambda d: d.find_element(By.XPATH, f"//*[contains(text(), 'crgate {title}')]")
    )
    ActionChains(browser).double_click(copy).perform()
    WebDriverWait(browser, WAIT_SECONDS).until(
        lambda d: any(f"/series/{copy_series}/instances/" in r["url"] for r in log.read(d))
    )
    settled(browser).until(lambda d: any(s > 5 for s in drawn_canvases(d)))
    if syntax == "j2k":
        screenshot(browser, tmp_path, "viewer-ohif.png")
    seen = log.read(browser)
    frames = [r for r in seen if "/frames/" in r["url"]]
    assert any(f"/series/{copy_series}/" in r["url"] for r in frames)  # the copy, decoded by OHIF
    assert any(f"/series/{copy_series}/" not in r["url"] for r in frames)  # and the original
    failed = [r for r in seen if r.get("status", 200) >= 400]
    assert failed == [], failed
    assert [r for r in seen if not r["url"].startswith((url, "data:", "blob:", "chrome:"))] == []


class RequestLog:
    """Every request the page made so far (chromium's performance log hands each entry out
    once), less the browser's own /favicon.ico probe."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def read(self, driver: webdriver.Chrome) -> list[dict[str, Any]]:
        self.seen += [r for r in network_requests(driver) if not r["url"].endswith("/favicon.ico")]
        return list(self.seen)
