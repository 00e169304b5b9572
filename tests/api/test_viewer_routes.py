"""/viewer/ routes on the real OHIF build (`make viewer`): pages need a session, assets are
served as files, nothing outside the build is reachable; the build's relocation; --viewer
checks."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.viewer import MARKER, check_dist, relocate
from services.core.errors import InvalidParameter
from services.runtime import Runtime
from tests.cli.test_policy_cli import CRGATE
from tests.integration.test_viewer import DIST


@pytest.fixture
def viewer_client(state: Runtime, admin_key: str) -> Iterator[TestClient]:
    settings = state.settings.model_copy(update={"viewer_dir": DIST})
    app = create_app(settings, state=state)
    with TestClient(app, follow_redirects=False) as client:
        yield client


def test_pages_need_a_session_and_assets_are_files(
    viewer_client: TestClient, admin_key: str
) -> None:
    page = viewer_client.get("/viewer/viewer", params={"StudyInstanceUIDs": "1.2.3"})
    assert page.status_code == 303
    assert page.headers["location"] == (
        "/login?next=%2Fviewer%2Fviewer%3FStudyInstanceUIDs%3D1.2.3"
    )
    bundle = next(DIST.glob("app.bundle.*.js")).name
    js = viewer_client.get(f"/viewer/{bundle}")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert b'__webpack_require__.p = "/viewer/"' in js.content
    config = viewer_client.get("/viewer/app-config.js")
    assert b"/dicomweb" in config.content and b"cloudfront" not in config.content
    wasm = next(DIST.glob("*.wasm")).name
    assert viewer_client.get(f"/viewer/{wasm}").headers["content-type"] == "application/wasm"
    signed_in = viewer_client.get("/viewer/", headers={"Authorization": f"Bearer {admin_key}"})
    assert signed_in.status_code == 200 and 'window.PUBLIC_URL="/viewer/"' in signed_in.text
    assert viewer_client.get("/viewer").status_code == 308


@pytest.mark.parametrize(
    "path", ["../../pyproject.toml", "..%2F..%2Fpyproject.toml", "nope.js", f"{MARKER}"]
)
def test_nothing_outside_the_build_and_no_missing_asset_as_a_page(
    viewer_client: TestClient, path: str
) -> None:
    response = viewer_client.get(f"/viewer/{path}")
    assert response.status_code == 404, (path, response.status_code)
    assert response.headers["content-type"].startswith("application/problem+json")


def test_relocate_moves_a_root_build_under_viewer_once(tmp_path: Path) -> None:
    build = tmp_path / "dist"
    build.mkdir()
    html = '<script>window.PUBLIC_URL="/"</script><script src="/app.bundle.1.js"></script>'
    (build / "index.html").write_text(html)
    (build / "app.bundle.1.js").write_text('__webpack_require__.p = "/";')
    (build / "app.bundle.css").write_text("a{background:url(/x.woff2)} b{background:url(//cdn)}")
    with pytest.raises(InvalidParameter, match="not set up for crgate"):
        check_dist(build)
    changed = relocate(build)
    assert set(changed) == {"index.html", "app.bundle.1.js", "app.bundle.css", "app-config.js"}
    assert 'src="/viewer/app.bundle.1.js"' in (build / "index.html").read_text()
    assert 'window.PUBLIC_URL="/viewer/"' in (build / "index.html").read_text()
    assert (build / "app.bundle.css").read_text() == (
        "a{background:url(/viewer/x.woff2)} b{background:url(//cdn)}"
    )
    assert relocate(build) == []  # a second run changes nothing
    assert check_dist(build) == build.resolve()


def test_serve_with_a_folder_that_is_no_viewer_stops_with_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run(
        [str(CRGATE), "serve", "--data-dir", str(tmp_path / "var"), "--viewer", str(empty)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not an OHIF viewer build" in lines[0] and "make viewer" in lines[0]
    assert not (tmp_path / "var").exists()  # nothing started, nothing made
    shutil.rmtree(empty)


def test_the_image_and_make_viewer_ship_the_same_ohif() -> None:
    root = Path(__file__).resolve().parents[2]
    make = next(
        line.split(":=")[1].strip()
        for line in (root / "Makefile").read_text().splitlines()
        if line.startswith("OHIF_VERSION")
    )
    docker = next(
        line.split("=")[1].strip()
        for line in (root / "Dockerfile").read_text().splitlines()
        if line.startswith("ARG OHIF_VERSION")
    )
    assert make == docker
    assert "CRGATE_VIEWER_DIR: /app/viewer" in (root / "docker-compose.yml").read_text()


def test_the_console_study_page_links_to_the_viewer(
    viewer_client: TestClient, state: Runtime, admin_key: str, mg_study: str
) -> None:
    auth = {"Authorization": f"Bearer {admin_key}"}
    page = viewer_client.get(f"/ui/studies/{mg_study}", headers=auth)
    assert page.status_code == 200, page.text
    assert f'href="/viewer/viewer?StudyInstanceUIDs={mg_study}"' in page.text
