"""The console's pages: each reads what the JSON API shows and renders it with Jinja2.

Every page is declared public and checks the caller itself, so that a browser that is not
signed in is sent to ``/login?next=<page>`` rather than shown a 401. A page whose data needs a
higher role answers 403 with the API's text; changes go through the JSON API from the page's
script (with the session's CSRF token), so roles and audit are the API's own.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from services.api.deps import PUBLIC, SessionDep
from services.api.ui import presets, studies
from services.api.ui.access import csrf_of, refusal, signed_in, to_login
from services.core import audit, jobs
from services.core.auth import Principal, Role, list_keys
from services.core.codecs import OutputSyntax
from services.core.db.tables import Forward, Instance, Job, Series, Study, Sweep
from services.core.destinations import list_destinations, snapshot
from services.core.dicom.terms import BODY_PARTS, MODALITIES
from services.core.dicom.uids import validate_uid
from services.core.errors import CrgateError, InvalidParameter
from services.core.policies import DEFAULT_FORWARD_WHAT, DEFAULT_QUIET_SECONDS, FORWARDABLE

HERE = Path(__file__).parent
STATIC = HERE / "static"
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
templates = Jinja2Templates(directory=HERE / "templates")

router = APIRouter(tags=["console"], dependencies=[Depends(PUBLIC)])

NAV = (
    ("studies", "Studies", Role.VIEWER),
    ("jobs", "Jobs", Role.VIEWER),
    ("policies", "Policies", Role.OPERATOR),
    ("sweeps", "CR safety studies", Role.OPERATOR),
    ("destinations", "Destinations", Role.ADMIN),
    ("audit", "Audit log", Role.ADMIN),
    ("keys", "API keys", Role.ADMIN),
)


def page(
    request: Request, name: str, who: Principal, code: int = 200, **context: Any
) -> HTMLResponse:
    nav = [(slug, label) for slug, label, role in NAV if who.role.allows(role)]
    base = {"who": who, "nav": nav, "csrf": csrf_of(request), "active": name.split(".")[0]}
    return templates.TemplateResponse(request, name, {**base, **context}, status_code=code)


def problem_page(request: Request, who: Principal, status: int, detail: str) -> HTMLResponse:
    return page(request, "error.html", who, code=status, status_code=status, detail=detail)


def _gate(request: Request, role: Role) -> Principal | Response:
    """The caller when allowed; a redirect to /login or a 403 page otherwise."""
    who = signed_in(request)
    if who is None:
        return to_login(request)
    refused = refusal(role, who)
    if refused:
        return problem_page(request, who, 403, refused)
    return who


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/ui/studies", status_code=303)


@router.get("/ui", include_in_schema=False)
@router.get("/ui/", include_in_schema=False)
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/studies", status_code=303)


@router.get("/favicon.ico", include_in_schema=False)
def favicon() -> Response:
    return FileResponse(STATIC / "favicon.svg", media_type=STATIC_TYPES[".svg"])


@router.get("/ui/static/{name}", include_in_schema=False)
def static_file(name: Annotated[str, PathParam(pattern=r"^[a-z0-9-]+\.(css|js|svg)$")]) -> Response:
    path = STATIC / name
    if not path.is_file():
        return Response(status_code=404)
    return FileResponse(path, media_type=STATIC_TYPES[path.suffix],
                        headers={"Cache-Control": "no-cache"})  # fmt: skip


@router.get("/ui/studies", include_in_schema=False)
def studies_page(
    request: Request,
    session: SessionDep,
    patient_id: Annotated[str, Query(max_length=64)] = "",
    date_from: Annotated[str, Query(max_length=10)] = "",
    date_to: Annotated[str, Query(max_length=10)] = "",
    modality: Annotated[str, Query(max_length=16)] = "",
    accession: Annotated[str, Query(max_length=16)] = "",
    page_number: Annotated[int, Query(alias="page", ge=1, le=100_000)] = 1,
) -> Response:
    who = _gate(request, Role.VIEWER)
    if not isinstance(who, Principal):
        return who
    form = studies.Search(patient_id.strip(), date_from, date_to, modality, accession.strip(),
                          page_number)  # fmt: skip
    rows, total = studies.search(session, form)
    query = {k: v for k, v in request.query_params.items() if k != "page"}
    return page(request, "studies.html", who, form=form, rows=rows, total=total,
                page_size=studies.PAGE_SIZE, modalities=studies.modalities(session),
                query=query)  # fmt: skip


@router.get("/ui/studies/{study_uid}", include_in_schema=False)
def study_page(
    request: Request,
    study_uid: Annotated[str, PathParam(max_length=64)],
    session: SessionDep,
    result: Annotated[str | None, Query(max_length=36)] = None,
) -> Response:
    who = _gate(request, Role.VIEWER)
    if not isinstance(who, Principal):
        return who
    try:
        validate_uid(study_uid, "Study Instance UID")
    except CrgateError as exc:
        return problem_page(request, who, 422, str(exc))
    study = session.get(Study, study_uid)
    if study is None:
        return problem_page(request, who, 404, f"study {study_uid} is not stored here")
    series = session.scalars(
        select(Series).where(Series.study_uid == study_uid).order_by(Series.series_number)
    ).all()
    counts = {s.series_uid: 0 for s in series}
    for uid in session.scalars(select(Instance.series_uid).where(Instance.study_uid == study_uid)):
        counts[uid] = counts.get(uid, 0) + 1
    results = [r.payload for r in jobs.results_of(session, study_uid)]
    chosen = next((r for r in results if r.get("result_id") == result), None)
    if result and chosen is None:
        return problem_page(request, who, 404, f"no result {result!r} for study {study_uid}")
    chosen = chosen or (results[0] if results else None)
    ordered = sorted(results, key=lambda r: (r.get("applied_cr") or 0, r.get("created_at") or ""))
    study_jobs = session.scalars(
        select(Job).where(Job.study_uid == study_uid).order_by(Job.created_at.desc()).limit(20)
    ).all()
    return page(request, "study.html", who, study=study, series=series, counts=counts,
                results=ordered, result=chosen, jobs=study_jobs,
                can_run=who.role.allows(Role.OPERATOR),
                viewer=getattr(request.app.state, "viewer", False))  # fmt: skip


@router.get("/ui/jobs", include_in_schema=False)
def jobs_page(
    request: Request,
    session: SessionDep,
    status: Annotated[str, Query(max_length=16)] = "",
    study_uid: Annotated[str, Query(max_length=64)] = "",
) -> Response:
    who = _gate(request, Role.VIEWER)
    if not isinstance(who, Principal):
        return who
    query = select(Job).order_by(Job.created_at.desc()).limit(100)
    if status:
        query = query.where(Job.status == status)
    if study_uid:
        query = query.where(Job.study_uid == study_uid)
    rows = session.scalars(query).all()
    undelivered = session.scalars(
        select(Forward)
        .where(Forward.state.in_(("failed", "retrying")))
        .order_by(Forward.updated_at.desc())
        .limit(100)
    ).all()
    return page(request, "jobs.html", who, rows=rows, status=status, study_uid=study_uid,
                forwards=undelivered, can_resend=who.role.allows(Role.OPERATOR))  # fmt: skip


@router.get("/ui/policies", include_in_schema=False)
def policies_page(request: Request, session: SessionDep) -> Response:
    who = _gate(request, Role.OPERATOR)
    if not isinstance(who, Principal):
        return who
    from services.api.routes.policies import list_policies  # the API's own view of each row

    rows = list_policies(session)
    admin = who.role is Role.ADMIN
    return page(request, "policies.html", who, rows=rows, can_edit=admin,
                presets=presets.preview_all(session),
                destinations=[d.name for d in list_destinations(session)] if admin else [],
                syntaxes=[s.value for s in OutputSyntax if s.codec.is_available()],
                forwardable=FORWARDABLE, forward_default=DEFAULT_FORWARD_WHAT,
                quiet_default=DEFAULT_QUIET_SECONDS,
                modalities=sorted(MODALITIES.terms),
                body_parts=sorted(BODY_PARTS.terms))  # fmt: skip


@router.get("/ui/destinations", include_in_schema=False)
def destinations_page(request: Request, session: SessionDep) -> Response:
    who = _gate(request, Role.ADMIN)
    if not isinstance(who, Principal):
        return who
    rows = [snapshot(row) for row in list_destinations(session)]
    return page(request, "destinations.html", who, rows=rows)


@router.get("/ui/audit", include_in_schema=False)
def audit_page(
    request: Request,
    session: SessionDep,
    entity: Annotated[str, Query(max_length=32)] = "",
    since: Annotated[str, Query(max_length=32)] = "",
    page_number: Annotated[int, Query(alias="page", ge=1, le=100_000)] = 1,
) -> Response:
    who = _gate(request, Role.ADMIN)
    if not isinstance(who, Principal):
        return who
    try:
        when = datetime.fromisoformat(since) if since else None
    except ValueError:
        return problem_page(request, who, 422, f"since={since[:32]!r} is not a date and time")
    size = 50
    try:
        rows, total = audit.entries(session, entity=entity or None, since=when, limit=size,
                                    offset=(page_number - 1) * size)  # fmt: skip
    except InvalidParameter as exc:
        return problem_page(request, who, 422, str(exc))
    return page(request, "audit.html", who, rows=rows, total=total, entity=entity, since=since,
                entities=audit.ENTITIES, page_number=page_number, page_size=size)  # fmt: skip


@router.get("/ui/sweeps", include_in_schema=False)
def sweeps_page(request: Request, session: SessionDep) -> Response:
    who = _gate(request, Role.OPERATOR)
    if not isinstance(who, Principal):
        return who
    rows = session.scalars(select(Sweep).order_by(Sweep.created_at.desc()).limit(100)).all()
    return page(request, "sweeps.html", who, rows=rows)


@router.get("/ui/keys", include_in_schema=False)
def keys_page(request: Request, session: SessionDep) -> Response:
    who = _gate(request, Role.ADMIN)
    if not isinstance(who, Principal):
        return who
    return page(request, "keys.html", who, rows=list_keys(session), roles=[r.value for r in Role])
