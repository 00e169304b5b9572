"""QIDO-RS (PS3.18 10.6): search studies, series and instances.

Results are a DICOM JSON array (application/dicom+json); no match is ``200 []``.
Warnings (fuzzy matching not supported, ignored includefield, more results than one response
holds) come in ``Warning: 299`` headers. Matching rules: services/core/db/qido.py.
"""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from services.api.deps import READ_DICOMWEB, SessionDep
from services.api.dicomweb.endpoints import SERIES, STUDY, add_level_route
from services.core.db.qido import Level, parse_query, search
from services.core.dicom.mediatype import DICOM_JSON
from services.core.retrieve.negotiation import negotiate_metadata

router = APIRouter(dependencies=[Depends(READ_DICOMWEB)])

_RESOURCES = ("/studies", "/series", "/instances")


def dicomweb_root(request: Request) -> str:
    """The absolute DICOMweb base URL (``.../dicomweb``) of the route serving ``request``."""
    template = getattr(request.scope.get("route"), "path", request.url.path)
    cut = min((i for i in (template.find(r) for r in _RESOURCES) if i >= 0), default=0)
    return str(request.base_url).rstrip("/") + template[:cut]


def warning_header(request: Request, texts: list[str]) -> str:
    """RFC 9111 Warning header value with code 299 for each text."""
    agent = request.url.netloc or "crgate"
    return ", ".join(f'299 {agent} "{t.replace(chr(34), chr(39))}"' for t in texts)


def _search(
    request: Request,
    session: Session,
    *,
    level: Level,
    study: str | None = None,
    series: str | None = None,
) -> JSONResponse:
    negotiate_metadata(request.headers.get("accept"), "a QIDO-RS result")
    # an invalid query is 400 (PS3.18 8.3.4): problems.py maps it so under /dicomweb
    query = parse_query(
        level, request.query_params.multi_items(), study_uid=study, series_uid=series
    )
    result = search(session, query, retrieve_root=dicomweb_root(request))
    response = JSONResponse(result.items, media_type=DICOM_JSON)
    if result.warnings:
        response.headers["Warning"] = warning_header(request, result.warnings)
    return response


# one handler, a route per resource: (path, route name, level, summary after "QIDO-RS: ")
_SEARCHES = (
    ("/studies", "search_studies", Level.STUDY, "search for studies"),
    ("/series", "search_series", Level.SERIES, "search for series in all studies"),
    ("/instances", "search_instances", Level.INSTANCE, "search for instances in all studies"),
    (STUDY + "/series", "search_study_series", Level.SERIES, "search for series of a study"),
    (
        STUDY + "/instances",
        "search_study_instances",
        Level.INSTANCE,
        "search for instances of a study",
    ),
    (
        SERIES + "/instances",
        "search_series_instances",
        Level.INSTANCE,
        "search for instances of a series",
    ),
)

for _path, _name, _level, _summary in _SEARCHES:
    add_level_route(
        router,
        _path,
        _name,
        partial(_search, level=_level),
        deps={"request": Request, "session": SessionDep},
        summary=f"QIDO-RS: {_summary}",
    )
