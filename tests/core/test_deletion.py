"""Retention (CRGATE_RETENTION_DAYS, issue 16): crgate's derived copies and result files older
than N days go, originals and newer copies stay; a dry run deletes nothing; audited with actor
``retention``. On SQLite and PostgreSQL with a real store."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from services.core import deletion
from services.core.config import Settings
from services.core.contracts import JobStatus
from services.core.db.tables import AuditEntry, Instance, Job, Result, Series, Study
from services.core.dicom.uids import new_uid
from services.core.errors import InvalidParameter, NotFound
from services.core.ingest import Channel, Ingestor
from services.core.storage import InstanceStore

OLD = datetime.now(UTC) - timedelta(days=40)


def _ingest(ingestor: Ingestor, files: list[Path]) -> list[str]:
    out = []
    for path in files:
        staged = ingestor.store.new_staging_path()
        staged.write_bytes(path.read_bytes())
        out.append(ingestor.ingest_file(staged, channel=Channel.STOW).sop_instance_uid)
    return out


def _derive(ingestor: Ingestor, files: list[Path]) -> list[str]:
    """A worker's copy of each file, in a derived series of the same study."""
    series = new_uid()
    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = new_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        done = ingestor.ingest_dataset(ds, channel=Channel.WORKER, source="job:test")
        out.append(done.sop_instance_uid)
    return out


def _age(sessions: sessionmaker[Session], uids: list[str]) -> None:
    with sessions() as session, session.begin():
        session.execute(
            update(Instance).where(Instance.sop_instance_uid.in_(uids)).values(received_at=OLD)
        )


def _result(
    sessions: sessionmaker[Session], store: InstanceStore, study: str, when: datetime
) -> str:
    job_id, result_id = str(uuid.uuid4()), str(uuid.uuid4())
    with sessions() as session, session.begin():
        session.add(
            Job(
                id=job_id,
                idempotency_key=job_id,
                study_uid=study,
                cr=25.0,
                syntax="j2k",
                model="m",
                model_sha256="ab" * 32,
                policy_source="requested",
                trigger="api",
                status=JobStatus.SUCCEEDED.value,
                result_id=result_id,
            )
        )
        session.flush()
        session.add(
            Result(id=result_id, job_id=job_id, study_uid=study, payload={}, created_at=when)
        )
    folder = deletion.result_folder(store, result_id) / "overlays"
    folder.mkdir(parents=True)
    (folder / "1.2.3.png").write_bytes(b"png")
    return result_id


def _present(sessions: sessionmaker[Session]) -> set[str]:
    with sessions() as session:
        return set(session.scalars(select(Instance.sop_instance_uid)))


def test_retention_deletes_old_derived_copies_and_result_files_only(
    sessions: sessionmaker[Session],
    store: InstanceStore,
    ingestor: Ingestor,
    tiny_study_files: list[Path],
) -> None:
    originals = _ingest(ingestor, tiny_study_files)
    old_copies = _derive(ingestor, tiny_study_files[:2])
    new_copies = _derive(ingestor, tiny_study_files[2:])
    _age(sessions, originals + old_copies)  # originals as old as the old copies
    with sessions() as session:
        study = session.scalars(select(Instance.study_uid)).first()
        old_paths = [
            store.absolute(r.path)
            for r in session.scalars(
                select(Instance).where(Instance.sop_instance_uid.in_(old_copies))
            )
        ]
        old_series = session.scalars(
            select(Instance.series_uid).where(Instance.sop_instance_uid == old_copies[0])
        ).one()
    assert study is not None
    old_result = _result(sessions, store, study, OLD)
    new_result = _result(sessions, store, study, datetime.now(UTC))

    dry = deletion.run_retention(sessions, store, days=30, dry_run=True)
    assert (dry.instances, dry.result_folders, dry.files_removed) == (2, 1, 0)
    assert _present(sessions) == set(originals + old_copies + new_copies)
    assert all(p.is_file() for p in old_paths)
    with sessions() as session:
        assert session.scalars(select(AuditEntry)).first() is None

    done = deletion.run_retention(sessions, store, days=30)
    assert done.instances == 2 and done.series == 1 and done.studies == 0
    assert done.result_folders == 1 and done.files_removed == 3 and not done.files_not_removed
    assert _present(sessions) == set(originals + new_copies)
    assert not any(p.exists() for p in old_paths) and not old_paths[0].parent.exists()
    assert not deletion.result_folder(store, old_result).exists()
    assert deletion.result_folder(store, new_result).is_dir()
    with sessions() as session:
        assert session.get(Series, old_series) is None
        assert session.get(Result, old_result) is not None  # the row (the figures) stays
        entries = list(session.scalars(select(AuditEntry).order_by(AuditEntry.id)))
    assert {e.actor for e in entries} == {"retention"}
    assert {(e.entity, e.action) for e in entries} == {("instance", "delete"), ("result", "delete")}
    (instances,) = [e for e in entries if e.entity == "instance"]
    assert sorted(instances.before["sop_instance_uids"]) == sorted(old_copies)
    assert "30 days" in (instances.reason or "")

    again = deletion.run_retention(sessions, store, days=30)
    assert (again.instances, again.result_folders) == (0, 0)


def test_retention_days_must_be_positive(
    sessions: sessionmaker[Session], store: InstanceStore
) -> None:
    with pytest.raises(InvalidParameter):
        deletion.run_retention(sessions, store, days=0)


def test_the_housekeeping_pass_runs_retention_when_set_and_due(
    sessions: sessionmaker[Session],
    store: InstanceStore,
    ingestor: Ingestor,
    tiny_study_files: list[Path],
) -> None:
    copies = _derive(ingestor, tiny_study_files[:1])
    _age(sessions, copies)
    off = Settings(data_dir=store.root, retention_days=0)
    assert deletion.retention_pass(off, sessions, store) is None
    assert _present(sessions) == set(copies)
    on = Settings(data_dir=store.root, retention_days=7)
    deletion._last_pass.clear()
    done = deletion.retention_pass(on, sessions, store, every_s=3600)
    assert done is not None and done.instances == 1
    assert _present(sessions) == set()
    assert deletion.retention_pass(on, sessions, store, every_s=3600) is None  # not due yet


def test_a_study_or_series_row_without_instances_is_deleted_too(
    sessions: sessionmaker[Session], store: InstanceStore
) -> None:
    study, series, other = new_uid(), new_uid(), new_uid()
    with sessions() as session, session.begin():
        session.add(Study(study_uid=study))
        session.flush()
        session.add_all(
            [Series(series_uid=series, study_uid=study), Series(series_uid=other, study_uid=study)]
        )
    done = deletion.delete_series(sessions, store, study, series, actor="test")
    assert (done.series, done.studies, done.instances) == (2, 1, 0)  # the study was left empty
    with sessions() as session:
        assert session.get(Study, study) is None and session.get(Series, other) is None
    with pytest.raises(NotFound):
        deletion.delete_study(sessions, store, study, actor="test")
