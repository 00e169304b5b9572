"""The worker's housekeeping task runs retention (CRGATE_RETENTION_DAYS, issue 16): an old
derived copy goes, the original stays, audited with actor ``retention``."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update

from services.core import deletion, jobs
from services.core.classify import JobContext
from services.core.config import Settings
from services.core.db.tables import AuditEntry, Instance
from services.core.dicom.uids import new_uid
from services.core.ingest import Channel
from services.runtime import build_job_context
from services.worker import app as worker_app
from services.worker.tasks import housekeeping


@pytest.fixture
def ctx(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[JobContext]:
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, retention_days=7)
    context = build_job_context(settings, create=True)
    monkeypatch.setattr(worker_app, "_context", context)
    monkeypatch.setattr(deletion, "_last_pass", [])
    yield context
    context.sessions.kw["bind"].dispose()


def test_housekeeping_deletes_old_derived_copies(
    ctx: JobContext, tiny_study_files: list[Path]
) -> None:
    staged = ctx.store.new_staging_path()
    staged.write_bytes(tiny_study_files[0].read_bytes())
    original = ctx.ingestor.ingest_file(staged, channel=Channel.STOW).sop_instance_uid
    ds = pydicom.dcmread(tiny_study_files[0])
    ds.SeriesInstanceUID, ds.SOPInstanceUID = new_uid(), new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    copy = ctx.ingestor.ingest_dataset(ds, channel=Channel.WORKER, source="job:x")
    with ctx.sessions() as session, session.begin():
        session.execute(update(Instance).values(received_at=jobs.now() - timedelta(days=8)))
    path = ctx.store.absolute(
        ctx.store.relative_path(copy.study_uid, copy.series_uid, copy.sop_instance_uid)
    )
    assert path.is_file()
    outcome = housekeeping.apply()
    assert outcome.successful(), outcome.traceback
    with ctx.sessions() as session:
        assert set(session.scalars(select(Instance.sop_instance_uid))) == {original}
        (entry,) = session.scalars(select(AuditEntry).where(AuditEntry.entity == "instance"))
    assert entry.actor == "retention" and entry.before["sop_instance_uids"] == [
        copy.sop_instance_uid
    ]
    assert not path.exists()
