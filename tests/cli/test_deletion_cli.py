"""``crgate delete study`` and ``crgate retention run`` (issue 16), through typer's CliRunner on
SQLite and PostgreSQL: a confirmation is required, the study goes, retention's dry run changes
nothing, and the audit log shows both."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from typer.testing import CliRunner, Result

from services.cli import app
from services.core.config import Settings
from services.core.db.tables import Instance
from services.core.dicom.uids import new_uid
from services.core.ingest import Channel
from services.runtime import build_job_context

runner = CliRunner()


@pytest.fixture
def stored(tmp_path: Path, database_url: str, tiny_study_files: list[Path]):  # type: ignore[no-untyped-def]
    """A data directory holding the tiny study and one derived copy; a `crgate` caller."""
    env = {"CRGATE_DATABASE_URL": database_url, "COLUMNS": "200"}
    data_dir = tmp_path / "var"
    made = runner.invoke(app, ["migrate", "--data-dir", str(data_dir)], env=env)
    assert made.exit_code == 0, made.output
    ctx = build_job_context(Settings(data_dir=data_dir, database_url=database_url))
    for path in tiny_study_files:
        staged = ctx.store.new_staging_path()
        staged.write_bytes(path.read_bytes())
        study = ctx.ingestor.ingest_file(staged, channel=Channel.STOW).study_uid
    ds = pydicom.dcmread(tiny_study_files[0])
    ds.SeriesInstanceUID, ds.SOPInstanceUID = new_uid(), new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ctx.ingestor.ingest_dataset(ds, channel=Channel.WORKER, source="job:x")

    def call(*args: str, days_env: str | None = None) -> Result:
        more = {"CRGATE_RETENTION_DAYS": days_env} if days_env is not None else {}
        return runner.invoke(app, [*args, "--data-dir", str(data_dir)], env={**env, **more})

    def count() -> int:
        with ctx.sessions() as session:
            return len(list(session.scalars(select(Instance.sop_instance_uid))))

    yield call, study, count
    ctx.sessions.kw["bind"].dispose()


def test_delete_study_needs_yes_then_deletes_and_audits(stored) -> None:  # type: ignore[no-untyped-def]
    crgate, study, count = stored
    refused = crgate("delete", "study", study)
    assert refused.exit_code == 2 and "add --yes" in refused.stderr
    assert count() == 5
    done = crgate("delete", "study", study, "--yes", "--json")
    assert done.exit_code == 0, done.output
    body = json.loads(done.stdout)
    assert body["studies"] == 1 and body["instances"] == 5 and body["files_removed"] == 5
    assert count() == 0
    again = crgate("delete", "study", study, "--yes")
    assert again.exit_code == 6 and again.stderr.startswith("error: study")
    bad = crgate("delete", "study", "1.2.x", "--yes")
    assert bad.exit_code == 2 and "not a valid DICOM UID" in bad.stderr
    audit = crgate("audit", "--entity", "study", "--json")
    (entry,) = [json.loads(line) for line in audit.stdout.splitlines()]
    assert entry["entity_id"] == study and entry["actor"].startswith("cli:")


def test_retention_run_dry_run_then_for_real(stored) -> None:  # type: ignore[no-untyped-def]
    crgate, _study, count = stored
    off = crgate("retention", "run")
    assert off.exit_code == 2 and "retention is off" in off.stderr
    # the copy was received just now: nothing is older than a day
    none = crgate("retention", "run", "--days", "1", "--json")
    assert none.exit_code == 0, none.output
    assert json.loads(none.stdout)["instances"] == 0
    # --days 0.000001 (0.09 s): the copy is older than that; originals are never touched
    dry = crgate("retention", "run", "--dry-run", days_env="0.000001")
    assert dry.exit_code == 0, dry.output
    assert "would delete 0 studies, 0 series, 1 instances" in dry.stdout
    assert count() == 5
    real = crgate("retention", "run", "--days", "0.000001", "--json")
    assert real.exit_code == 0, real.output
    assert json.loads(real.stdout)["instances"] == 1
    assert count() == 4
    audit = crgate("audit", "--entity", "instance", "--json")
    (entry,) = [json.loads(line) for line in audit.stdout.splitlines()]
    assert entry["actor"] == "retention" and entry["action"] == "delete"
    negative = crgate("retention", "run", "--days", "-1")
    assert negative.exit_code == 2 and negative.stderr.startswith("error:")
