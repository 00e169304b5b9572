"""CR safety studies as jobs: `POST /studies:cr-sweep` on studies already in the store.

The request names stored studies and their per-breast labels; the job links the studies' files
into a folder, writes the labels CSV and runs the same ``run_safety_study`` as `crgate study`,
with the report under ``<data-dir>/sweeps/<id>/report``. An interrupted job resumes from the CRs it
finished (the study's partial results live in the report folder).
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from services.core.classify import JobContext
from services.core.contracts import JobQueue, JobStatus, SweepPayload
from services.core.db.tables import Instance, Study, Sweep
from services.core.dicom.uids import validate_uid
from services.core.errors import CrgateError, InvalidInput, NotFound
from services.core.jobs import SWEEPS, hand_over, now
from services.core.ratio import STUDY_CRS_TEXT

log = logging.getLogger(__name__)


class BreastLabel(BaseModel):
    study_uid: str = Field(description="Study Instance UID (stored in crgate)")
    laterality: Literal["L", "R"]
    label: Literal["malignant", "benign", "normal"] | int = Field(
        description="malignant (or 1), benign / normal (or 0)"
    )


class SweepRequest(BaseModel):
    study_uids: list[str] = Field(min_length=1, description="stored studies to test on")
    labels: list[BreastLabel] = Field(min_length=1, description="one label per breast")
    model: str | None = Field(None, description="model name (default: the site's)")
    crs: str = Field(STUDY_CRS_TEXT, description="compression ratios, comma-separated")
    bootstrap: int = Field(1000, ge=100, le=20000, description="bootstrap resamples")
    margin: float = Field(0.02, gt=0, lt=0.5, description="non-inferiority margin (AUROC)")
    threshold: float | None = Field(
        None, ge=0, le=1, description="decision threshold (default: the card's)"
    )
    min_per_class: int | None = Field(
        None,
        ge=1,
        description="breasts per class below which no CR is recommended (default: the power "
        "calculation's for the margin, docs/cr-study.md)",
    )


def submit(ctx: JobContext, request: SweepRequest, *, requested_by: str | None) -> Sweep:
    """Check the request against the store and the models, then record a queued sweep."""
    from services.lab.safety.sweep import parse_crs, resolve_model

    parse_crs(request.crs)
    resolve_model(request.model or ctx.settings.default_model, ctx.settings.models_dir)
    studies = sorted(set(request.study_uids))
    for uid in studies:
        validate_uid(uid, "Study Instance UID")
    with ctx.sessions() as session:
        known = set(session.scalars(select(Study.study_uid).where(Study.study_uid.in_(studies))))
    missing = [uid for uid in studies if uid not in known]
    if missing:
        raise NotFound(
            f"no stud{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)} in the store"
        )
    unknown = sorted({b.study_uid for b in request.labels} - set(studies))
    if unknown:
        raise InvalidInput(f"labels name studies that are not in study_uids: {', '.join(unknown)}")
    sweep = Sweep(
        id=str(uuid.uuid4()),
        status=JobStatus.QUEUED.value,
        params=request.model_dump(),
        progress_done=0,
        progress_total=0,
        attempts=0,
        requested_by=requested_by,
        queued_at=now(),
    )
    with ctx.sessions() as session, session.begin():
        session.add(sweep)
    return sweep


def request(
    ctx: JobContext, queue: JobQueue, body: SweepRequest, *, requested_by: str | None
) -> Sweep:
    """Start a sweep: check and record it (:func:`submit`), then hand it to the queue (its own
    queue, so that hours of sweep never hold up classifications). A queue that cannot take it
    leaves it recorded as queued: the housekeeping pass sends it again."""
    sweep = submit(ctx, body, requested_by=requested_by)
    hand_over(queue, SweepPayload(sweep_id=sweep.id), f"sweep {sweep.id}")
    return sweep


def sweep_dir(ctx: JobContext, sweep_id: str) -> Path:
    return ctx.store.root / "sweeps" / sweep_id


def run_sweep_job(ctx: JobContext, sweep_id: str) -> dict[str, Any] | None:
    """Run the sweep to the end; its summary, or None when it failed (reason recorded)."""
    from services.lab.safety.run import run_safety_study
    from services.lab.safety.sweep import SafetyStudyConfig, parse_crs

    claimed = SWEEPS.claim(ctx.sessions, sweep_id, stale_after_s=ctx.settings.job_stale_seconds)
    if claimed is None:  # finished, run by another live worker, or out of attempts
        with ctx.sessions() as session:
            done = SWEEPS.get(session, sweep_id)
            return dict(done.summary or {}) if done.status == JobStatus.SUCCEEDED else None
    request = SweepRequest.model_validate(claimed.params)
    log.info("sweep %s: attempt %d", sweep_id, claimed.attempts)
    root = sweep_dir(ctx, sweep_id)
    try:
        data, labels = _materialise(ctx, request, root / "input")
        crs, notes = parse_crs(request.crs)
        # inside a daemonic Celery pool process no child processes may be started
        workers = 1 if multiprocessing.current_process().daemon else 0
        config = SafetyStudyConfig(
            crs=crs,
            bootstrap=request.bootstrap,
            margin=request.margin,
            threshold=request.threshold,
            min_per_class=request.min_per_class,
            workers=workers,
            notes=tuple(notes),
        )
        with SWEEPS.beating(ctx.sessions, sweep_id):
            run = run_safety_study(
                data,
                labels,
                request.model or ctx.settings.default_model,
                ctx.settings.models_dir,
                config,
                root / "report",
                ctx.store.root / "cache" / "study",
                progress=lambda what, done, total: SWEEPS.heartbeat(
                    ctx.sessions,
                    sweep_id,
                    done=done,
                    progress_total=total,
                    progress_what=what[:128],
                ),
            )
    except CrgateError as exc:
        SWEEPS.fail(ctx.sessions, sweep_id, reason=str(exc))
        log.warning("sweep %s failed: %s", sweep_id, exc)
        return None
    summary = _summary(run.out_dir, run.files)
    _succeed(ctx.sessions, sweep_id, summary)
    log.info("sweep %s succeeded", sweep_id)
    return summary


def _materialise(ctx: JobContext, request: SweepRequest, folder: Path) -> tuple[Path, Path]:
    """Link the studies' stored files into ``folder`` and write the labels CSV beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    with ctx.sessions() as session:
        rows = session.scalars(
            select(Instance).where(
                Instance.study_uid.in_(request.study_uids), Instance.channel != "worker"
            )
        ).all()
    if not rows:
        raise InvalidInput("the named studies hold no images")
    for row in rows:
        link = folder / f"{row.sop_instance_uid}.dcm"
        if not link.exists():
            link.symlink_to(ctx.store.absolute(row.path))
    labels = folder.parent / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_uid", "laterality", "label"])
        for b in request.labels:
            label = b.label if isinstance(b.label, str) else ("malignant" if b.label else "normal")
            writer.writerow([b.study_uid, b.laterality, label])
    return folder, labels


def _succeed(sessions: sessionmaker[Session], sweep_id: str, summary: dict[str, Any]) -> None:
    with sessions() as session, session.begin():
        session.execute(
            update(Sweep)
            .where(Sweep.id == sweep_id)
            .values(
                status=JobStatus.SUCCEEDED.value,
                reason=None,
                summary=summary,
                finished_at=now(),
                progress_done=Sweep.progress_total,
            )
        )


def _summary(out_dir: Path, files: dict[str, str]) -> dict[str, Any]:
    """The recommendation and the report's file names, from results.json."""
    data = json.loads((out_dir / files["results"]).read_text())
    return {"recommendation": data.get("recommendation"), "files": sorted(files.values())}


def report_path(ctx: JobContext, session: Session, sweep_id: str, name: str) -> Path:
    """The file ``name`` of the sweep's report folder; NotFound for an unknown sweep or file
    (a name that leaves the folder included)."""
    view(session, sweep_id)  # 404 for an unknown sweep
    folder = (sweep_dir(ctx, sweep_id) / "report").resolve()
    path = (folder / name).resolve()
    if path.parent != folder or not path.is_file():
        raise NotFound(f"sweep {sweep_id} has no report file {name!r}")
    return path


def view(session: Session, sweep_id: str) -> dict[str, Any]:
    sweep = SWEEPS.get(session, sweep_id)
    return {
        "id": sweep.id,
        "status": sweep.status,
        "reason": sweep.reason,
        "progress": {
            "done": sweep.progress_done,
            "total": sweep.progress_total,
            "what": sweep.progress_what,
        },
        "attempts": sweep.attempts,
        "params": sweep.params,
        "summary": sweep.summary,
        "created_at": sweep.created_at.isoformat() if sweep.created_at else None,
        "finished_at": sweep.finished_at.isoformat() if sweep.finished_at else None,
        "report_url": f"/sweeps/{sweep.id}/report/report.html"
        if sweep.status == JobStatus.SUCCEEDED
        else None,
    }
