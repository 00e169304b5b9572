"""OHIF Viewer v3 under ``/viewer/``, on the same origin as the API (``crgate serve --viewer``).

The viewer is the prebuilt ``dist/`` of ``@ohif/app`` from the npm registry. It was built to live
at a site's root, so ``make viewer`` unpacks it into build/ohif/dist and moves it under
``/viewer/`` (:func:`relocate`: the webpack public path of its bundles and workers, the paths in
index.html, its CSS and manifest) and writes ``app-config.js``: one DICOMweb data source,
crgate's own ``/dicomweb`` on the page's origin. The browser session cookie from ``/login``
authenticates its requests: no key in a URL. A page request without a session is sent to
``/login?next=...``; the assets (OHIF's own code) are public.

    .venv/bin/python -m services.api.viewer build/ohif/dist     # what `make viewer` runs
"""

from __future__ import annotations

import json
import mimetypes
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from services.api.deps import PUBLIC, require
from services.core.auth import Role
from services.core.errors import InvalidParameter, NotFound

PREFIX = "/viewer"
MARKER = ".crgate-viewer"  # written by relocate(): the prefix the build now lives under
_ROOT_PATHS = re.compile(r'(href|src)="/(?!/)')
_CSS_URL = re.compile(r"url\(/(?!/)")
_PUBLIC_PATH = '__webpack_require__.p = "/"'
_VIEWER = require(Role.VIEWER, anonymous_read=True)

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")


def check_dist(dist: Path) -> Path:
    """The folder of an unpacked ``@ohif/app`` dist moved under /viewer/ (InvalidParameter
    naming what is wrong)."""
    folder = Path(dist).resolve()
    if not (folder / "index.html").is_file() or not any(folder.glob("app.bundle.*.js")):
        raise InvalidParameter(
            f"{dist}: not an OHIF viewer build (no index.html and app.bundle.*.js); "
            "`make viewer` unpacks @ohif/app into build/ohif/dist"
        )
    marker = folder / MARKER
    if not marker.is_file() or marker.read_text().strip() != PREFIX:
        raise InvalidParameter(
            f"{dist}: this OHIF build is not set up for crgate (run `python -m "
            f"services.api.viewer {dist}`, as `make viewer` does)"
        )
    return folder


def relocate(dist: Path) -> list[str]:
    """Move an OHIF build made for the site's root under /viewer/, and write crgate's
    app-config.js. Returns the files it changed; a second run changes nothing."""
    folder = Path(dist)
    if (folder / MARKER).is_file():
        return []
    changed = []
    rules: list[tuple[str, Callable[[str], str]]] = [
        ("*.js", lambda t: t.replace(_PUBLIC_PATH, f'__webpack_require__.p = "{PREFIX}/"')),
        ("*.css", lambda t: _CSS_URL.sub(f"url({PREFIX}/", t)),
        ("manifest.json", lambda t: t.replace('"/assets/', f'"{PREFIX}/assets/')),
        ("index.html", _index_html),
    ]
    for pattern, rewrite in rules:
        for path in sorted(folder.glob(pattern)):
            text = path.read_text(encoding="utf-8")
            new = rewrite(text)
            if new != text:
                path.write_text(new, encoding="utf-8")
                changed.append(path.name)
    (folder / "app-config.js").write_text(app_config(), encoding="utf-8")
    (folder / MARKER).write_text(PREFIX + "\n")
    return [*changed, "app-config.js"]


def _index_html(html: str) -> str:
    """OHIF's index.html with its root paths and PUBLIC_URL under /viewer/."""
    html = _ROOT_PATHS.sub(rf'\1="{PREFIX}/', html)
    return html.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{PREFIX}/"')


def app_config() -> str:
    """``window.config`` for crgate: its DICOMweb on the page's origin, study list on."""
    source: dict[str, Any] = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "crgate",
        "configuration": {
            "friendlyName": "crgate",
            "name": "crgate",
            "qidoSupportsIncludeField": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": PREFIX,
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "defaultDataSourceName": "crgate",
        "dataSources": [source],
    }
    roots = (
        "var root = window.location.origin + '/dicomweb';\n"
        "var c = window.config.dataSources[0].configuration;\n"
        "c.qidoRoot = root; c.wadoRoot = root; c.wadoUriRoot = root;\n"
    )
    return (
        "/* written by crgate (services/api/viewer.py): OHIF against crgate's DICOMweb */\n"
        f"window.config = {json.dumps(config, indent=2)};\n{roots}"
    )


def install(app: FastAPI, dist: Path) -> None:
    """Serve the OHIF build in ``dist`` under /viewer/."""
    folder = check_dist(dist)
    index = (folder / "index.html").read_text(encoding="utf-8")
    router = APIRouter(tags=["viewer"])

    @router.get(
        f"{PREFIX}/{{path:path}}",
        summary="The OHIF viewer (its pages need a browser session: /login)",
        dependencies=[Depends(PUBLIC)],
        response_model=None,
    )
    def asset(path: str, request: Request) -> Response:
        target = (folder / path).resolve() if path else folder
        if folder not in target.parents and target != folder:
            raise NotFound(f"no viewer file {path!r}")
        if target.is_file() and target.name not in ("index.html", MARKER):
            return FileResponse(target)
        if "." in Path(path).name:  # a missing asset, not a page of the viewer's router
            raise NotFound(f"no viewer file {path!r}")
        try:
            _VIEWER(request)
        except HTTPException as exc:
            if exc.status_code != 401:
                raise
            query = f"?{request.url.query}" if request.url.query else ""
            page = quote(f"{PREFIX}/{path}{query}", safe="")
            return RedirectResponse(f"/login?next={page}", status_code=303)
        return HTMLResponse(index)

    @router.get(PREFIX, include_in_schema=False, dependencies=[Depends(PUBLIC)])
    def bare() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/", status_code=308)

    app.include_router(router)
    app.state.viewer = True  # the console's study page links to it


if __name__ == "__main__":
    for name in relocate(Path(sys.argv[1])):
        print(f"set up for /viewer/: {name}")
