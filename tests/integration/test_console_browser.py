"""The web console in a real browser: Debian's headless chromium (selenium, chromium-driver)
against `crgate serve` as a process, with a phantom mammography study classified at CR 25.

Log in through the redirect, find the study, see the four panes of every image show pixels,
zoom and pan them together, run a classification at another CR from the page, create and revoke
a key. Nothing is requested from another host, and no request fails. With
``CRGATE_SCREENSHOTS=<folder>`` the pages' screenshots are kept there (docs/img is made so).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from tests.api.test_forwards import Pacs, pacs  # noqa: F401  (pacs: a fixture)
from tests.api.test_stow import STOW_TYPE, multipart
from tests.api.test_sweeps import body as sweep_body
from tests.api.test_sweeps import labelled_studies  # noqa: F401  (a fixture)
from tests.integration.test_browser import (  # noqa: F401  (fixtures)
    WAIT_SECONDS,
    Server,
    browser,
    network_requests,
    page_servers,
    server,
    wait_for,
)

pytestmark = pytest.mark.tools

SCREEN = (1366, 768)
MAX_SCREENSHOT_BYTES = 300_000

PANE_PIXELS = """
    const img = arguments[0];
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let min = 255, max = 0, sum = 0;
    for (let i = 0; i < data.length; i += 4) {
        const v = data[i]; min = Math.min(min, v); max = Math.max(max, v); sum += v;
    }
    return [img.naturalWidth, img.naturalHeight, min, max, sum / (data.length / 4)];
"""


def log_in(driver: webdriver.Chrome, gateway: Server, page: str) -> None:
    """Open ``page``; the console sends the browser to /login and, with the key, back."""
    driver.get(f"{gateway.url}{page}")
    wait_for(driver, "#key").send_keys(gateway.admin_key)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    WebDriverWait(driver, WAIT_SECONDS).until(lambda d: d.current_url.endswith(page))


def store_and_classify(gateway: Server, files: list[Path], cr: float) -> dict[str, Any]:
    bearer = {"Authorization": f"Bearer {gateway.admin_key}"}
    body = multipart(*(p.read_bytes() for p in files))
    stow = httpx.post(f"{gateway.url}/dicomweb/studies", content=body,
                      headers={**bearer, "Content-Type": STOW_TYPE}, timeout=60)  # fmt: skip
    assert stow.status_code == 200, stow.text
    study = stow.json()["00081190"]["Value"][0].rsplit("/studies/", 1)[1]
    done = httpx.post(f"{gateway.url}/studies/{study}/classify", params={"cr": cr, "wait": 240},
                      headers=bearer, timeout=300)  # fmt: skip
    assert done.status_code == 200, done.text
    result: dict[str, Any] = done.json()["result"]
    return result


def screenshot(driver: webdriver.Chrome, tmp_path: Path, name: str) -> None:
    """Keep a PNG of the window (quantised if needed to stay small); check it is not blank."""
    raw = driver.get_screenshot_as_png()
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    assert np.asarray(image).std() > 10, f"{name} looks blank"
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    if out.tell() > MAX_SCREENSHOT_BYTES:
        out = io.BytesIO()
        image.quantize(colors=128).save(out, format="PNG", optimize=True)
    assert out.tell() < MAX_SCREENSHOT_BYTES, f"{name}: {out.tell()} bytes"
    (tmp_path / name).write_bytes(out.getvalue())
    folder = os.environ.get("CRGATE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / name, Path(folder) / name)


def transforms(driver: webdriver.Chrome, article: Any) -> list[str]:
    return [
        driver.execute_script("return getComputedStyle(arguments[0]).transform", img)
        for img in article.find_elements(By.CSS_SELECTOR, "img.layer")
    ]


def test_console_login_study_panes_zoom_classify_and_keys(
    server: Server,  # noqa: F811
    browser: webdriver.Chrome,  # noqa: F811
    mg_study_files: list[Path],
    tmp_path: Path,
) -> None:
    result = store_and_classify(server, mg_study_files, 25)
    study = result["study_uid"]
    browser.set_window_size(*SCREEN)
    browser.get("about:blank")
    network_requests(browser)  # drain what the browser's own start page loaded

    # not signed in: the console sends the browser to /login and back
    browser.get(f"{server.url}/")
    log_in(browser, server, "/ui/studies")

    # search with the form, keyboard only
    Select(browser.find_element(By.NAME, "modality")).select_by_visible_text("MG")
    browser.find_element(By.NAME, "accession").submit()
    link = wait_for(browser, f"a[href='/ui/studies/{study}']")
    assert "1 result" in browser.find_element(By.CSS_SELECTOR, "table.studies").text
    screenshot(browser, tmp_path, "console-studies.png")
    link.click()

    # the four panes of every image show pixels
    wait_for(browser, "article.image")
    articles = browser.find_elements(By.CSS_SELECTOR, "article.image")
    assert len(articles) == 4
    WebDriverWait(browser, WAIT_SECONDS).until(
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('img.layer')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    first = articles[0]
    for img in first.find_elements(By.CSS_SELECTOR, "img.layer"):
        width, height, low, high, _mean = browser.execute_script(PANE_PIXELS, img)
        assert width > 0 and height > 0
        assert high - low > 20, f"{img.get_attribute('alt')} is blank: {low}..{high}"
        assert width <= 1024 and height <= 1024  # the pane's size, not the image's
    browser.execute_script("document.getElementById('res-h').scrollIntoView()")
    screenshot(browser, tmp_path, "console-study.png")
    browser.execute_script("window.scrollTo(0, 0)")

    # zoom and pan: one handler, the same transform on the four panes
    assert set(transforms(browser, first)) == {"none"} or len(set(transforms(browser, first))) == 1
    browser.find_element(By.CSS_SELECTOR, "button[data-zoom=in]").click()
    zoomed = transforms(browser, first)
    assert len(set(zoomed)) == 1 and zoomed[0].startswith("matrix(1.25")
    viewport = first.find_elements(By.CSS_SELECTOR, ".viewport")[2]  # the difference pane
    ActionChains(browser).click_and_hold(viewport).move_by_offset(30, 20).release().perform()
    panned = transforms(browser, first)
    assert len(set(panned)) == 1 and panned != zoomed
    viewport.send_keys("+")
    keyed = transforms(browser, first)
    assert len(set(keyed)) == 1 and keyed != panned
    # once the zoom settles the panes are asked again at the zoomed size
    original = first.find_element(By.CSS_SELECTOR, "img[data-kind=original]")
    WebDriverWait(browser, WAIT_SECONDS).until(
        lambda d: d.execute_script(
            "const i = arguments[0]; return i.complete && i.naturalHeight > "
            "i.parentElement.clientHeight * 1.5",
            original,
        )
    )

    # run it again at CR 10 from the form (fetch with the session's CSRF token)
    field = browser.find_element(By.ID, "classify-cr")
    field.clear()
    field.send_keys("10")
    browser.find_element(By.CSS_SELECTOR, "#classify button[type=submit]").click()
    WebDriverWait(browser, 240).until(lambda d: "?result=" in d.current_url)
    heading = wait_for(browser, "#res-h").text
    assert heading.startswith("classify at CR 10"), heading
    assert browser.find_element(By.ID, "problem").get_attribute("hidden") is not None
    assert browser.find_element(By.ID, "cr-slider").get_attribute("max") == "1"

    browser.get(f"{server.url}/ui/jobs")
    wait_for(browser, "tr[data-job]")
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr[data-job][data-status=succeeded]")) == 2
    screenshot(browser, tmp_path, "console-jobs.png")

    # an API key: created, shown once, works, revoked, refused
    browser.get(f"{server.url}/ui/keys")
    wait_for(browser, "#key-name").send_keys("selenium reader")
    browser.find_element(By.CSS_SELECTOR, "#new-key button[type=submit]").click()
    shown = wait_for(browser, "#created:not([hidden]) #created-key")
    WebDriverWait(browser, WAIT_SECONDS).until(lambda d: shown.text.startswith("crg_"))
    token = shown.text
    qido = f"{server.url}/dicomweb/studies"
    bearer = {"Authorization": f"Bearer {token}"}
    assert httpx.get(qido, headers=bearer).status_code == 200
    prefix = token.split("_")[1]
    made_id = browser.find_element(By.CSS_SELECTOR, "table.keys tbody tr:last-child").get_attribute(
        "data-key"
    )
    browser.find_element(By.CSS_SELECTOR, f"button[aria-label^='Revoke key {prefix}']").click()
    WebDriverWait(browser, WAIT_SECONDS).until(
        lambda d: "revoked" in d.find_element(By.CSS_SELECTOR, f"tr[data-key='{made_id}']").text
    )
    screenshot(browser, tmp_path, "console-keys.png")
    assert httpx.get(qido, headers=bearer).status_code == 401
    browser.get(f"{server.url}/ui/audit?entity=key")
    assert "revoke" in wait_for(browser, "table.audit").text

    # a policy changed in the browser, and its audit entry
    browser.get(f"{server.url}/ui/policies")
    form = wait_for(browser, "form.policy-edit")
    screenshot(browser, tmp_path, "console-policies.png")
    policy_id = form.get_attribute("data-policy")
    open_details(browser, form)
    cr_field = form.find_element(By.NAME, "cr")
    cr_field.clear()
    cr_field.send_keys("13")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, WAIT_SECONDS).until(expected_conditions.staleness_of(form))
    row = wait_for(browser, f"form.policy-edit[data-policy='{policy_id}']")
    assert row.find_element(By.NAME, "cr").get_attribute("value") == "13"
    browser.get(f"{server.url}/ui/audit?entity=policy")
    entry = wait_for(browser, "table.audit tbody tr").text
    assert "update" in entry and '"cr": 13' in entry, entry
    screenshot(browser, tmp_path, "console-audit.png")

    requests = network_requests(browser)
    local = (server.url, "data:", "blob:", "about:blank")
    outside = [r["url"] for r in requests if not r["url"].startswith(local)]
    assert not outside, f"requests left the server: {outside}"
    failed = [r for r in requests if r.get("status", 200) >= 400]
    assert not failed, failed
    # last, as its refused creation is a failed request on purpose
    create_change_and_delete_a_policy(
        browser, server, {"Authorization": f"Bearer {server.admin_key}"}
    )


def open_details(driver: webdriver.Chrome, inside: Any) -> None:
    """Unfold the <details> an element sits in (forms are folded until asked for)."""
    driver.execute_script("arguments[0].closest('details').open = true", inside)


def create_change_and_delete_a_policy(
    driver: webdriver.Chrome, gateway: Server, bearer: dict[str, str]
) -> None:
    """A policy made, refused, changed and deleted from the policies page, as the API sees it."""
    api = f"{gateway.url}/policies"
    driver.get(f"{gateway.url}/ui/policies")
    form = wait_for(driver, "form#new-policy")
    open_details(driver, form)
    form.find_element(By.NAME, "modality").send_keys("CTX")  # not a defined term
    form.find_element(By.NAME, "body_part").clear()
    form.find_element(By.NAME, "body_part").send_keys("HEAD")
    form.find_element(By.NAME, "cr").send_keys("8")
    Select(form.find_element(By.NAME, "syntax")).select_by_visible_text("htj2k")
    form.find_element(By.NAME, "auto_compress").click()
    quiet = form.find_element(By.NAME, "quiet_seconds")
    quiet.clear()
    quiet.send_keys("45")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    problem = driver.find_element(By.ID, "problem")
    WebDriverWait(driver, WAIT_SECONDS).until(lambda d: problem.is_displayed())
    assert "422" in problem.text and "'CTX' is not a Modality defined term" in problem.text
    assert [p for p in httpx.get(api, headers=bearer).json() if p["modality"] == "CTX"] == []
    modality = form.find_element(By.NAME, "modality")
    modality.clear()
    modality.send_keys("CT")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, WAIT_SECONDS).until(expected_conditions.staleness_of(form))
    made = [p for p in httpx.get(api, headers=bearer).json() if p["body_part"] == "HEAD"]
    assert len(made) == 1, made
    policy = made[0]
    assert (policy["modality"], policy["cr"], policy["syntax"]) == ("CT", 8, "htj2k")
    assert policy["auto_compress"] and policy["keep_copy"] and not policy["auto_classify"]
    assert policy["quiet_seconds"] == 45 and policy["expected_instances"] is None
    # changed: keep no copy, complete at 40 instances
    edit = wait_for(driver, f"form.policy-edit[data-policy='{policy['id']}']")
    open_details(driver, edit)
    edit.find_element(By.NAME, "keep_copy").click()
    edit.find_element(By.NAME, "expected_instances").send_keys("40")
    edit.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, WAIT_SECONDS).until(expected_conditions.staleness_of(edit))
    changed = httpx.get(f"{api}/{policy['id']}", headers=bearer).json()
    assert not changed["keep_copy"] and changed["expected_instances"] == 40
    assert (changed["cr"], changed["syntax"], changed["quiet_seconds"]) == (8, "htj2k", 45)
    row = wait_for(driver, f"tr[data-policy-row='{policy['id']}']")
    assert "complete at 40 instances" in row.text and "keep copy" not in row.text
    # deleted, after the browser's confirmation
    delete = row.find_element(By.CSS_SELECTOR, f"button[data-delete-policy='{policy['id']}']")
    open_details(driver, delete)
    delete.click()
    WebDriverWait(driver, WAIT_SECONDS).until(expected_conditions.alert_is_present())
    driver.switch_to.alert.accept()
    WebDriverWait(driver, WAIT_SECONDS).until(expected_conditions.staleness_of(row))
    assert httpx.get(f"{api}/{policy['id']}", headers=bearer).status_code == 404
    assert not driver.find_elements(By.CSS_SELECTOR, f"tr[data-policy-row='{policy['id']}']")
    default = [p for p in httpx.get(api, headers=bearer).json() if p["default"]]
    assert not driver.find_elements(
        By.CSS_SELECTOR, f"button[data-delete-policy='{default[0]['id']}']"
    )
    driver.get(f"{gateway.url}/ui/audit?entity=policy")
    cells = [
        [td.text for td in row.find_elements(By.TAG_NAME, "td")[2:4]]
        for row in driver.find_elements(By.CSS_SELECTOR, "table.audit tbody tr")[:3]
    ]
    mine = f"policy {policy['id']}"
    assert cells == [["delete", mine], ["update", mine], ["create", mine]], cells


def test_console_starts_a_cr_safety_study_and_opens_its_report(
    server: Server,  # noqa: F811
    browser: webdriver.Chrome,  # noqa: F811
    labelled_studies: tuple[list[Path], list[dict[str, Any]]],  # noqa: F811
    tmp_path: Path,
) -> None:
    files, rows = labelled_studies
    bearer = {"Authorization": f"Bearer {server.admin_key}", "Content-Type": STOW_TYPE}
    stow = httpx.post(f"{server.url}/dicomweb/studies", content=multipart(
        *(p.read_bytes() for p in files)), headers=bearer, timeout=60)  # fmt: skip
    assert stow.status_code == 200, stow.text
    browser.get("about:blank")
    network_requests(browser)
    log_in(browser, server, "/ui/sweeps")
    field = wait_for(browser, "#sweep-body")
    field.clear()
    field.send_keys(json.dumps(sweep_body(rows)))
    browser.find_element(By.CSS_SELECTOR, "#new-sweep button[type=submit]").click()
    report = WebDriverWait(browser, 240).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-sweep] .js-result a")
    )[0]
    assert "succeeded" in browser.find_element(By.CSS_SELECTOR, "tr[data-sweep]").text
    screenshot(browser, tmp_path, "console-sweeps.png")
    report.click()
    WebDriverWait(browser, WAIT_SECONDS).until(lambda d: d.current_url.endswith("report.html"))
    assert "AUROC" in browser.find_element(By.TAG_NAME, "body").text
    requests = network_requests(browser)
    local = (server.url, "data:", "blob:", "about:blank")
    assert [r["url"] for r in requests if not r["url"].startswith(local)] == []
    assert [r for r in requests if r.get("status", 200) >= 400] == []


def test_console_shows_an_undelivered_forward_and_resends_it(
    server: Server,  # noqa: F811
    browser: webdriver.Chrome,  # noqa: F811
    pacs: Callable[..., Pacs],  # noqa: F811
    tmp_path: Path,
) -> None:
    """A PACS refuses a copy (0xC000 with its comment): the Jobs page shows the forward failed
    with the peer's answer; Re-send in the browser hands it back, and the PACS takes it."""
    peer = pacs([0xC000], comment="disk quota reached")
    bearer = {"Authorization": f"Bearer {server.admin_key}"}
    with httpx.Client(base_url=server.url, headers=bearer, timeout=120) as api:
        made = api.post(
            "/destinations",
            json={"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": peer.port},
        )
        assert made.status_code == 201, made.text
        policy = api.post(
            "/policies",
            json={"modality": "CT", "cr": 10, "auto_compress": True, "quiet_seconds": 0,
                  "forward_to": ["pacs"], "forward_what": ["compressed"]},
        )  # fmt: skip
        assert policy.status_code == 201, policy.text
        ct = get_testdata_file("CT_small.dcm")
        assert ct is not None
        stow = api.post(
            "/dicomweb/studies",
            content=multipart(Path(ct).read_bytes()),
            headers={"Content-Type": STOW_TYPE},
        )
        assert stow.status_code == 200, stow.text

        def failed() -> list[Any]:
            return list(api.get("/forwards", params={"state": "failed"}).json()["items"])

        WebDriverWait(browser, WAIT_SECONDS * 2).until(lambda _: failed())

    log_in(browser, server, "/ui/jobs")
    row = wait_for(browser, "tr[data-forward]")
    assert "0xC000" in row.text and "disk quota reached" in row.text
    screenshot(browser, tmp_path, "console-forwards.png")
    row.find_element(By.CSS_SELECTOR, "button[data-resend]").click()
    WebDriverWait(browser, WAIT_SECONDS).until(lambda _: len(peer.received) == 1)

    def delivered(driver: webdriver.Chrome) -> bool:
        driver.refresh()
        return "Every forward was delivered" in driver.page_source

    WebDriverWait(browser, WAIT_SECONDS, poll_frequency=1).until(delivered)
    browser.get(f"{server.url}/ui/destinations")  # the echo button answers on the page
    wait_for(browser, "button[data-echo]").click()
    echo = browser.find_element(By.CSS_SELECTOR, "output[data-echo-out]")
    WebDriverWait(browser, WAIT_SECONDS).until(lambda _: echo.text.startswith("reachable"))
    assert "Verification" in echo.text  # this peer stores but does not echo
    screenshot(browser, tmp_path, "console-destinations.png")
