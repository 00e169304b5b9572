"""Deleting stored objects: studies, series and instances (DICOMweb DELETE, `crgate delete`),
a result crgate made (its row, files and DICOM objects), and retention of crgate's derived
copies (`CRGATE_RETENTION_DAYS`, run by the worker's housekeeping and `crgate retention run`).

One order, always: the index rows go in one transaction with their audit entry, COMMIT, then
the files. A crash between the two leaves orphan files that no row names, never a row naming a
missing file. A file that cannot be removed is logged (its store-relative path: UIDs only) and
reported in the answer; the index is consistent whatever happens to the files.

When a study's last instance goes, so do its study row, its ``study_arrivals`` row and its
results (with their files); its jobs keep their rows: a queued or running one is failed with
the reason, one whose result was deleted is marked failed with that reason, so that asking
again makes a new result.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, exists, select, update
from sqlalchemy.orm import Session, sessionmaker

from services.core import audit
from services.core.config import Settings
from services.core.contracts import JobStatus
from services.core.db.tables import Instance, Job, Result, Series, Study, StudyArrival
from services.core.dicom.uids import validate_uid
from services.core.errors import InvalidParameter, NotFound
from services.core.ingest import Channel
from services.core.storage import InstanceStore

log = logging.getLogger(__name__)

RETENTION_ACTOR = "retention"
RETENTION_EVERY_S = 3600.0  # housekeeping runs retention at most this often per process
MAX_LISTED = 1000  # UIDs an audit entry lists (the counts are always whole)
_CHUNK = 500  # UIDs per IN (...) list
STUDY_GONE = (
    "study {study} was deleted: its images are no longer in the store; ask again once it is "
    "stored again"
)
RESULT_GONE = "its result {result} was deleted; ask again to make a new one"


@dataclass
class Deleted:
    """What one deletion removed: the answer of the routes and the CLI."""

    what: str  # study, series, instance, result, retention
    uid: str | None = None
    dry_run: bool = False
    studies: int = 0
    series: int = 0
    instances: int = 0
    results: int = 0
    result_folders: int = 0
    jobs_failed: int = 0
    files_removed: int = 0
    files_not_removed: list[str] = field(default_factory=list)  # store-relative paths

    def as_dict(self) -> dict[str, Any]:
        return {
            "deleted": self.what,
            "uid": self.uid,
            "dry_run": self.dry_run,
            "studies": self.studies,
            "series": self.series,
            "instances": self.instances,
            "results": self.results,
            "result_folders": self.result_folders,
            "jobs_failed": self.jobs_failed,
            "files_removed": self.files_removed,
            "files_not_removed": list(self.files_not_removed),
        }


@dataclass
class _Files:
    """The files to remove once the index commit is done."""

    instances: list[tuple[str, str]] = field(default_factory=list)  # (SOP UID, relative path)
    folders: list[str] = field(default_factory=list)  # result ids


# -- studies, series, instances ---------------------------------------------------------------


def delete_study(
    sessions: sessionmaker[Session], store: InstanceStore, study_uid: str, *, actor: str
) -> Deleted:
    """Delete a study: every instance (crgate's derived ones too), its results and files."""
    validate_uid(study_uid, "Study Instance UID")
    return _delete_level(sessions, store, "study", study_uid, actor, study_uid=study_uid)


def delete_series(
    sessions: sessionmaker[Session],
    store: InstanceStore,
    study_uid: str,
    series_uid: str,
    *,
    actor: str,
) -> Deleted:
    validate_uid(study_uid, "Study Instance UID")
    validate_uid(series_uid, "Series Instance UID")
    return _delete_level(
        sessions, store, "series", series_uid, actor, study_uid=study_uid, series_uid=series_uid
    )


def delete_instance(
    sessions: sessionmaker[Session],
    store: InstanceStore,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    *,
    actor: str,
) -> Deleted:
    validate_uid(study_uid, "Study Instance UID")
    validate_uid(series_uid, "Series Instance UID")
    validate_uid(sop_uid, "SOP Instance UID")
    return _delete_level(
        sessions,
        store,
        "instance",
        sop_uid,
        actor,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
    )


def _delete_level(
    sessions: sessionmaker[Session],
    store: InstanceStore,
    level: str,
    uid: str,
    actor: str,
    *,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> Deleted:
    report = Deleted(level, uid)
    with sessions() as session, session.begin():
        _hold(session, study_uid)
        query = select(Instance).where(Instance.study_uid == study_uid)
        if series_uid is not None:
            query = query.where(Instance.series_uid == series_uid)
        if sop_uid is not None:
            query = query.where(Instance.sop_instance_uid == sop_uid)
        rows = list(session.scalars(query))
        empty_row = _empty_row(session, level, study_uid, series_uid) if not rows else False
        if not rows and not empty_row:
            raise NotFound(_not_found(study_uid, series_uid, sop_uid))
        files = _drop_instances(
            session, rows, report, series_uid=_series_key(level, series_uid), study_uid=study_uid
        )
        audit.record(
            session,
            actor=actor,
            action="delete",
            entity=level,
            entity_id=uid,
            before=_before(report, study_uid, rows),
            after=None,
        )
    _remove_files(sessions, store, files, report)
    return report


def _hold(session: Session, study_uid: str) -> None:
    """Lock the study's row, then its series' rows, until the commit, before the instances are
    listed (PostgreSQL; SQLite has one writer).

    An ingest takes a key-share lock on the study's row first (``repository.upsert_instance``):
    one that has taken it is waited for, and its instance is listed and deleted with the rest;
    one that has not waits for ours and makes the rows again (``Ingestor._index_new``). Without
    this, an instance committed after the listing went with the study's cascade, its file left
    behind, after its sender had been told it was stored.
    """
    session.execute(select(Study.study_uid).where(Study.study_uid == study_uid).with_for_update())
    session.execute(
        select(Series.series_uid).where(Series.study_uid == study_uid).with_for_update()
    )


def _series_key(level: str, series_uid: str | None) -> str | None:
    return series_uid if level == "series" else None


def _empty_row(session: Session, level: str, study_uid: str, series_uid: str | None) -> bool:
    """True when the study (or series) has an index row but no instance: deletable too."""
    if level == "study":
        return session.get(Study, study_uid) is not None
    if level == "series" and series_uid is not None:
        row = session.get(Series, series_uid)
        return row is not None and row.study_uid == study_uid
    return False


def _not_found(study_uid: str, series_uid: str | None, sop_uid: str | None) -> str:
    if sop_uid is not None:
        return f"instance {sop_uid} of series {series_uid} in study {study_uid} is not stored here"
    if series_uid is not None:
        return f"series {series_uid} of study {study_uid} is not stored here"
    return f"study {study_uid} is not stored here"


def _drop_instances(
    session: Session,
    rows: Sequence[Instance],
    report: Deleted,
    *,
    series_uid: str | None = None,
    study_uid: str | None = None,
) -> _Files:
    """Delete ``rows``, then the series and studies they leave empty (with what hangs on a
    study); ``series_uid`` and ``study_uid`` are looked at too (a row without instances).
    Return the files to remove after the commit."""
    files = _Files(instances=[(r.sop_instance_uid, r.path) for r in rows])
    uids = [r.sop_instance_uid for r in rows]
    for chunk in _chunks(uids):
        gone = session.execute(delete(Instance).where(Instance.sop_instance_uid.in_(chunk)))
        report.instances += _rowcount(gone)  # another deletion may have taken some meanwhile
    series = {r.series_uid for r in rows} | ({series_uid} if series_uid else set())
    for one in sorted(series):
        if not _any(session, Instance.series_uid == one):
            gone = session.execute(delete(Series).where(Series.series_uid == one))
            report.series += _rowcount(gone)
    studies = {r.study_uid for r in rows} | ({study_uid} if study_uid else set())
    for one in sorted(studies):
        if not _any(session, Instance.study_uid == one):
            _drop_study(session, one, report, files)
    return files


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def _any(session: Session, condition: Any) -> bool:
    return bool(session.scalar(select(exists().where(condition))))


def _drop_study(session: Session, study_uid: str, report: Deleted, files: _Files) -> None:
    """A study without instances: its series and study rows, its arrival row, its results
    (their folders are removed after the commit); its unfinished jobs fail with the reason."""
    report.series += _rowcount(session.execute(delete(Series).where(Series.study_uid == study_uid)))
    report.studies += _rowcount(session.execute(delete(Study).where(Study.study_uid == study_uid)))
    session.execute(delete(StudyArrival).where(StudyArrival.study_uid == study_uid))
    for result in session.scalars(select(Result).where(Result.study_uid == study_uid)).all():
        _drop_result_row(session, result, report, files)
    unfinished = session.execute(
        update(Job)
        .where(
            Job.study_uid == study_uid,
            Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
        )
        .values(
            status=JobStatus.FAILED.value,
            reason=STUDY_GONE.format(study=study_uid),
            finished_at=datetime.now(UTC),
        )
    )
    report.jobs_failed += _rowcount(unfinished)


def _drop_result_row(session: Session, result: Result, report: Deleted, files: _Files) -> None:
    """Delete a result row; its job keeps its row, failed with the reason (asking again makes a
    new result); its folder is removed after the commit."""
    session.execute(
        update(Job)
        .where(Job.id == result.job_id, Job.result_id == result.id)
        .values(
            status=JobStatus.FAILED.value,
            result_id=None,
            reason=RESULT_GONE.format(result=result.id),
        )
    )
    session.delete(result)
    session.flush()
    report.results += 1
    files.folders.append(result.id)


def _before(report: Deleted, study_uid: str, rows: Sequence[Instance]) -> dict[str, Any]:
    """The audit entry's ``before``: counts and UIDs, never a patient's name, ID or birth date."""
    return {
        "study_uid": study_uid,
        "studies": report.studies,
        "series": report.series,
        "instances": report.instances,
        "results": report.results,
        "jobs_failed": report.jobs_failed,
        "series_uids": sorted({r.series_uid for r in rows})[:MAX_LISTED],
        "sop_instance_uids": [r.sop_instance_uid for r in rows][:MAX_LISTED],
    }


# -- results ----------------------------------------------------------------------------------


def result_folder(store: InstanceStore, result_id: str) -> Path:
    """Where a result's files are (``JobContext.results_dir``)."""
    return store.root / "results" / result_id


def delete_result(
    sessions: sessionmaker[Session],
    store: InstanceStore,
    result_id: str,
    *,
    study_uid: str | None = None,
    actor: str,
) -> Deleted:
    """Delete a result: its row, the DICOM objects its job stored (derived series, overlay
    captures, SR) and its files. ``study_uid``, when given, must be the result's study."""
    if study_uid is not None:
        validate_uid(study_uid, "Study Instance UID")
    report = Deleted("result", result_id)
    with sessions() as session, session.begin():
        result = session.get(Result, result_id)
        if result is None or (study_uid is not None and result.study_uid != study_uid):
            where = f" for study {study_uid}" if study_uid else ""
            raise NotFound(f"no result {result_id[:64]!r}{where}")
        study, job_id = result.study_uid, result.job_id
        rows = _result_objects(session, result)
        files = _Files()
        _drop_result_row(session, result, report, files)
        more = _drop_instances(session, rows, report)
        files.instances += more.instances
        files.folders += more.folders
        audit.record(
            session,
            actor=actor,
            action="delete",
            entity="result",
            entity_id=result_id,
            before={**_before(report, study, rows), "job_id": job_id},
            after=None,
        )
    _remove_files(sessions, store, files, report)
    return report


def _result_objects(session: Session, result: Result) -> list[Instance]:
    """The instances a result's job stored: its source mark, and the payload's references."""
    named = set()
    outputs = (result.payload or {}).get("outputs") or {}
    for key in ("derived", "overlays", "copies"):
        for ref in outputs.get(key) or []:
            if isinstance(ref, dict) and ref.get("sop_instance_uid"):
                named.add(str(ref["sop_instance_uid"]))
    report = outputs.get("report")
    if isinstance(report, dict) and report.get("sop_instance_uid"):
        named.add(str(report["sop_instance_uid"]))
    marked = select(Instance).where(
        Instance.study_uid == result.study_uid,
        Instance.channel == Channel.WORKER.value,
        Instance.source == f"job:{result.job_id}",
    )
    found = {r.sop_instance_uid: r for r in session.scalars(marked)}
    for chunk in _chunks(sorted(named - set(found))):
        query = select(Instance).where(
            Instance.sop_instance_uid.in_(chunk), Instance.channel == Channel.WORKER.value
        )
        found.update({r.sop_instance_uid: r for r in session.scalars(query)})
    return list(found.values())


def deleted_meanwhile(sessions: sessionmaker[Session], job_id: str) -> bool:
    """True when the job was failed while it ran: its study was deleted under it."""
    with sessions() as session:
        job = session.get(Job, job_id)
        return job is None or job.status == JobStatus.FAILED.value


def discard_outputs(
    sessions: sessionmaker[Session], store: InstanceStore, job_id: str, result_id: str
) -> Deleted:
    """Remove what a job stored after its study was deleted under it (its DICOM objects would
    bring the study back) and its result's files; the job stays failed with the reason."""
    report = Deleted("result", result_id)
    with sessions() as session, session.begin():
        rows = list(
            session.scalars(
                select(Instance).where(
                    Instance.channel == Channel.WORKER.value, Instance.source == f"job:{job_id}"
                )
            )
        )
        files = _drop_instances(session, rows, report)
        files.folders.append(result_id)
        if rows:
            audit.record(
                session,
                actor="worker",
                action="delete",
                entity="result",
                entity_id=result_id,
                before={**_before(report, rows[0].study_uid, rows), "job_id": job_id},
                after=None,
                reason="its study was deleted while the job ran",
            )
    _remove_files(sessions, store, files, report)
    return report


# -- retention --------------------------------------------------------------------------------


def run_retention(
    sessions: sessionmaker[Session],
    store: InstanceStore,
    *,
    days: float,
    dry_run: bool = False,
    actor: str = RETENTION_ACTOR,
    now: datetime | None = None,
) -> Deleted:
    """Delete crgate's derived copies (instances stored by the worker: compressed copies,
    overlays, SR) received more than ``days`` ago, and the files of results made before then.
    Originals are never touched. ``dry_run`` counts what would go and changes nothing."""
    if not days > 0:
        raise InvalidParameter(f"retention days must be more than 0, not {days}")
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    report = Deleted("retention", dry_run=dry_run)
    with sessions() as session, session.begin():
        rows = list(
            session.scalars(
                select(Instance).where(
                    Instance.channel == Channel.WORKER.value, Instance.received_at < cutoff
                )
            )
        )
        folders = [
            r.id
            for r in session.scalars(select(Result).where(Result.created_at < cutoff))
            if result_folder(store, r.id).exists()
        ]
        if dry_run:
            report.instances = len(rows)
            report.result_folders = len(folders)
            return report  # nothing was changed: the commit writes nothing
        files = _drop_instances(session, rows, report)
        files.folders += [f for f in folders if f not in files.folders]
        by_study: dict[str, list[Instance]] = {}
        for row in rows:
            by_study.setdefault(row.study_uid, []).append(row)
        reason = f"retention: derived copies older than {days:g} days (CRGATE_RETENTION_DAYS)"
        for study_uid, some in sorted(by_study.items()):
            audit.record(
                session,
                actor=actor,
                action="delete",
                entity="instance",
                entity_id=study_uid,
                before={
                    "study_uid": study_uid,
                    "instances": len(some),
                    "sop_instance_uids": [r.sop_instance_uid for r in some][:MAX_LISTED],
                },
                after=None,
                reason=reason,
            )
        for result_id in folders:
            audit.record(
                session,
                actor=actor,
                action="delete",
                entity="result",
                entity_id=result_id,
                before={"files": "result folder"},
                after=None,
                reason=reason,
            )
    report.result_folders = len(files.folders)
    _remove_files(sessions, store, files, report)
    return report


_last_pass: list[float] = []  # monotonic time of this process's last retention pass


def retention_pass(
    settings: Settings,
    sessions: sessionmaker[Session],
    store: InstanceStore,
    *,
    every_s: float = RETENTION_EVERY_S,
) -> Deleted | None:
    """Retention from the worker's housekeeping: at most once every ``every_s`` per process,
    when CRGATE_RETENTION_DAYS is set; never raises (a failed pass is logged, tried again)."""
    if not settings.retention_days:
        return None
    if _last_pass and time.monotonic() - _last_pass[-1] < every_s:
        return None
    _last_pass[:] = [time.monotonic()]
    try:
        done = run_retention(sessions, store, days=settings.retention_days)
    except Exception as exc:  # housekeeping goes on; the next pass tries again
        log.warning("retention pass failed: %s", type(exc).__name__)
        _last_pass.clear()
        return None
    if done.instances or done.result_folders:
        log.info(
            "retention: %d derived instances and %d result folders older than %g days deleted",
            done.instances,
            done.result_folders,
            settings.retention_days,
        )
    return done


# -- files, after the commit ------------------------------------------------------------------


def _remove_files(
    sessions: sessionmaker[Session], store: InstanceStore, files: _Files, report: Deleted
) -> None:
    """Remove the files of deleted rows; never raises. An instance stored again meanwhile
    (a row with the same path exists now) keeps its file: each check holds the UID's lock."""
    replaced = _replaced_copies(store, {sop for sop, _ in files.instances})
    parents: set[Path] = set()
    with sessions() as session:
        for sop, relative in files.instances:
            with store.lock(sop):
                again = session.get(Instance, sop, populate_existing=True)
                session.rollback()  # each check reads what is committed now
                if again is not None and again.path == relative:
                    continue
                _unlink(store, relative, report)
                for copy in replaced.get(sop, []):
                    _unlink(store, f"replaced/{copy}", report)
            parents.add((store.root / relative).parent)
    for folder in files.folders:
        _remove_tree(store, result_folder(store, folder), report)
    _prune(store, parents)


def _unlink(store: InstanceStore, relative: str, report: Deleted) -> None:
    try:
        path = store.absolute(relative)
        path.unlink()
        report.files_removed += 1
    except FileNotFoundError:
        return
    except (OSError, NotFound) as exc:
        _not_removed(relative, exc, report)


def _remove_tree(store: InstanceStore, folder: Path, report: Deleted) -> None:
    if not folder.exists():
        return

    def failed(_function: Any, path: str, info: Any) -> None:
        _not_removed(str(Path(path).relative_to(store.root)), info[1], report)

    count = sum(1 for p in folder.rglob("*") if p.is_file())
    shutil.rmtree(folder, onerror=failed)
    report.files_removed += max(0, count - sum(1 for p in folder.rglob("*") if p.is_file()))


def _not_removed(relative: str, exc: BaseException, report: Deleted) -> None:
    reason = getattr(exc, "strerror", None) or type(exc).__name__
    log.warning("deleted from the index but not removed from the store: %s (%s)", relative, reason)
    report.files_not_removed.append(relative)


def _replaced_copies(store: InstanceStore, sops: set[str]) -> dict[str, list[str]]:
    """Older copies kept under ``replaced/`` (``<sop>.<stamp>.dcm``) of the given instances."""
    found: dict[str, list[str]] = {}
    if not sops:
        return found
    try:
        names = [p.name for p in store.replaced.iterdir()]
    except OSError:
        return found
    for name in names:
        sop = name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""
        if sop in sops:
            found.setdefault(sop, []).append(name)
    return found


def _prune(store: InstanceStore, folders: Iterable[Path]) -> None:
    """Remove series folders, then study folders, left empty (a folder in use stays)."""
    studies: set[Path] = set()
    for folder in folders:
        if store.instances in folder.parents:
            _rmdir(folder)
            studies.add(folder.parent)
    for folder in studies:
        if store.instances in folder.parents:
            _rmdir(folder)


def _rmdir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (stored again meanwhile), or not ours
        folder.rmdir()


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]
