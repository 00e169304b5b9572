"""DELETE of studies, series, instances (/dicomweb) and of results (issue 16): admin only, index
rows first, then files; QIDO and WADO answer 404 after; every deletion audited without patient
values; a file that cannot be removed is reported, never a 500. SQLite and PostgreSQL."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from requests import HTTPError
from sqlalchemy import func, select

from services.core import jobs
from services.core.auth import Role
from services.core.contracts import JobStatus, JobTrigger
from services.core.db.tables import (
    AuditEntry,
    Instance,
    Job,
    Result,
    Series,
    Study,
    StudyArrival,
)
from services.core.ingest import Channel
from services.core.runner import run_job
from services.runtime import Runtime

UNKNOWN = "1.2.826.0.1.3680043.8.498.999"


def _instances(state: Runtime, study: str, channel: str | None = None) -> list[Instance]:
    with state.sessions() as session:
        query = select(Instance).where(Instance.study_uid == study)
        if channel is not None:
            query = query.where(Instance.channel == channel)
        return list(session.scalars(query.order_by(Instance.sop_instance_uid)))


def _count(state: Runtime, table: type, **where: str) -> int:
    with state.sessions() as session:
        query = select(func.count()).select_from(table)
        for column, value in where.items():
            query = query.where(getattr(table, column) == value)
        return int(session.scalar(query) or 0)


def _audit(state: Runtime, entity: str) -> list[AuditEntry]:
    with state.sessions() as session:
        query = select(AuditEntry).where(AuditEntry.entity == entity)
        return list(session.scalars(query.order_by(AuditEntry.id)))


def _patient_values(files: list[Path]) -> set[str]:
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    values = {str(ds.PatientName), str(ds.PatientID), str(ds.get("PatientBirthDate", ""))}
    return {v for v in values if v}


def _free_of(entries: list[AuditEntry], values: set[str]) -> None:
    for entry in entries:
        text = json.dumps([entry.before, entry.after, entry.reason, entry.entity_id])
        for value in values:
            assert value not in text, (value, text)


def _classify(client: TestClient, study: str) -> dict[str, str]:
    """A classify job run to its result: the job's id and the result's id."""
    response = client.post(f"/studies/{study}/classify", params={"cr": 25, "wait": 120})
    assert response.status_code == 200, response.text
    job = response.json()["job"]
    assert job["status"] == "succeeded", job
    return {"id": job["id"], "result_id": job["result_id"]}


def _key(make_key: Callable[..., str], role: Role) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(role)}"}


def _paths(study: str, rows: list[Instance]) -> dict[str, str]:
    first = rows[0]
    return {
        "study": f"/dicomweb/studies/{study}",
        "series": f"/dicomweb/studies/{study}/series/{first.series_uid}",
        "instance": f"/dicomweb/studies/{study}/series/{first.series_uid}"
        f"/instances/{first.sop_instance_uid}",
        "result": f"/studies/{study}/results/{UNKNOWN}",
    }


@pytest.mark.parametrize("role", [Role.VIEWER, Role.OPERATOR])
def test_only_an_admin_deletes(
    anon_client: TestClient,
    make_key: Callable[..., str],
    state: Runtime,
    mg_study: str,
    role: Role,
) -> None:
    rows = _instances(state, mg_study)
    for path in _paths(mg_study, rows).values():
        response = anon_client.delete(path, headers=_key(make_key, role))
        assert response.status_code == 403, (path, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert "admin" in response.json()["detail"]
    assert len(_instances(state, mg_study)) == len(rows)


def test_unknown_is_404_and_a_malformed_uid_400(client: TestClient, mg_study: str) -> None:
    for path in (
        f"/dicomweb/studies/{UNKNOWN}",
        f"/dicomweb/studies/{mg_study}/series/{UNKNOWN}",
        f"/dicomweb/studies/{mg_study}/series/{UNKNOWN}/instances/{UNKNOWN}",
        f"/studies/{mg_study}/results/{UNKNOWN}",
        f"/studies/{UNKNOWN}/results/{UNKNOWN}",
    ):
        response = client.delete(path)
        assert response.status_code == 404, (path, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
    for path in ("/dicomweb/studies/1.2.x", f"/dicomweb/studies/{mg_study}/series/01.2"):
        response = client.delete(path)
        assert response.status_code == 400, (path, response.text)
        assert "not a valid DICOM UID" in response.json()["detail"]
    bad = client.delete(f"/studies/1.2.x/results/{UNKNOWN}")
    assert bad.status_code == 422, bad.text


def test_an_instance_then_its_series_go_from_index_store_qido_and_wado(
    client: TestClient, state: Runtime, mg_study: str, mg_study_files: list[Path]
) -> None:
    rows = _instances(state, mg_study)
    first = rows[0]
    file = state.store.absolute(first.path)
    assert file.is_file()
    response = client.delete(_paths(mg_study, rows)["instance"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["deleted"] == "instance" and body["instances"] == 1
    assert body["files_removed"] == 1 and body["files_not_removed"] == []
    assert not file.exists()
    assert _count(state, Instance, sop_instance_uid=first.sop_instance_uid) == 0
    series_url = f"/dicomweb/studies/{mg_study}/series/{first.series_uid}"
    wado = client.get(f"{series_url}/instances/{first.sop_instance_uid}")
    assert wado.status_code == 404
    listed = client.get(f"/dicomweb/studies/{mg_study}/instances").json()
    assert len(listed) == len(rows) - 1
    assert client.delete(_paths(mg_study, rows)["instance"]).status_code == 404

    left = [r for r in rows if r.series_uid == first.series_uid and r is not first]
    response = client.delete(series_url)
    assert response.status_code == 200, response.text
    assert response.json()["instances"] == len(left) and response.json()["series"] == 1
    assert _count(state, Series, series_uid=first.series_uid) == 0
    assert not file.parent.exists(), "an emptied series folder stays behind"
    assert client.get(series_url).status_code == 404
    (entry,) = _audit(state, "instance")
    assert entry.action == "delete" and entry.entity_id == first.sop_instance_uid
    assert entry.before["sop_instance_uids"] == [first.sop_instance_uid]
    assert entry.actor and entry.after is None
    _free_of(_audit(state, "instance") + _audit(state, "series"), _patient_values(mg_study_files))


def test_a_study_goes_with_its_results_and_jobs_keep_their_rows(
    client: TestClient, state: Runtime, mg_study: str, mg_study_files: list[Path]
) -> None:
    done = _classify(client, mg_study)
    result_id = done["result_id"]
    assert _instances(state, mg_study, Channel.WORKER.value)
    folder = state.job_context.results_dir(result_id)
    assert folder.is_dir()
    study_dir = state.store.root / "instances" / mg_study
    assert study_dir.is_dir()

    response = client.delete(f"/dicomweb/studies/{mg_study}")
    assert response.status_code == 200, response.text
    body = response.json()
    stored = len(list(study_dir.rglob("*.dcm")))
    assert stored == 0
    assert body["studies"] == 1 and body["results"] == 1 and body["files_not_removed"] == []
    assert body["instances"] >= 4 + 4  # originals and the job's objects
    for table in (Instance, Series, Study, StudyArrival, Result):
        assert _count(state, table, study_uid=mg_study) == 0, table.__name__
    assert not study_dir.exists() and not folder.exists()
    with state.sessions() as session:
        job = session.get(Job, done["id"])
        assert job is not None and job.result_id is None and job.status == JobStatus.FAILED
    assert client.get(f"/dicomweb/studies/{mg_study}").status_code == 404
    assert client.get("/dicomweb/studies", params={"StudyInstanceUID": mg_study}).json() == []
    assert client.get(f"/studies/{mg_study}/results/{result_id}").status_code == 404
    (entry,) = _audit(state, "study")
    assert entry.entity_id == mg_study and entry.before["instances"] == body["instances"]
    _free_of([entry], _patient_values(mg_study_files))
    assert client.delete(f"/dicomweb/studies/{mg_study}").status_code == 404


def test_deleting_a_result_removes_its_objects_and_files_and_keeps_the_originals(
    client: TestClient, state: Runtime, mg_study: str
) -> None:
    originals = {r.sop_instance_uid for r in _instances(state, mg_study)}
    done = _classify(client, mg_study)
    result = client.get(f"/studies/{mg_study}/results/{done['result_id']}").json()
    outputs = result["outputs"]
    made = {r["sop_instance_uid"] for r in [*outputs["derived"], *outputs["overlays"]]}
    made.add(outputs["report"]["sop_instance_uid"])
    derived = _instances(state, mg_study, Channel.WORKER.value)
    assert {r.sop_instance_uid for r in derived} == made
    files = [state.store.absolute(r.path) for r in derived]
    folder = state.job_context.results_dir(done["result_id"])
    overlays = list(folder.rglob("*.png"))
    assert overlays and all(f.is_file() for f in files)

    response = client.delete(f"/studies/{mg_study}/results/{done['result_id']}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["deleted"] == "result" and body["results"] == 1
    assert body["instances"] == len(made) and body["studies"] == 0
    assert body["files_removed"] == len(made) + len(overlays)
    assert not folder.exists() and not any(f.exists() for f in files)
    assert {r.sop_instance_uid for r in _instances(state, mg_study)} == originals
    for series_uid in {r.series_uid for r in derived}:
        assert _count(state, Series, series_uid=series_uid) == 0
    assert client.get(f"/studies/{mg_study}/results/{done['result_id']}").status_code == 404
    job = client.get(f"/jobs/{done['id']}").json()
    assert job["status"] == "failed" and job["result_id"] is None
    assert "was deleted" in job["reason"]
    (entry,) = _audit(state, "result")
    assert entry.entity_id == done["result_id"] and entry.before["job_id"] == done["id"]
    # asking again makes a new result (the job is run again)
    again = _classify(client, mg_study)
    assert again["result_id"] != done["result_id"]


def test_a_file_that_cannot_be_removed_is_reported_and_the_index_stays_consistent(
    client: TestClient, state: Runtime, mg_study: str
) -> None:
    rows = _instances(state, mg_study)
    first = rows[0]
    file = state.store.absolute(first.path)
    # a directory in the file's place: unlink fails even for root (chmod 0500 does not stop
    # root, who runs this suite in the container)
    file.unlink()
    file.mkdir()
    (file / "held").write_bytes(b"x")
    try:
        response = client.delete(_paths(mg_study, rows)["instance"])
    finally:
        shutil.rmtree(file)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["instances"] == 1 and body["files_removed"] == 0
    assert body["files_not_removed"] == [first.path]
    assert _count(state, Instance, sop_instance_uid=first.sop_instance_uid) == 0
    assert len(client.get(f"/dicomweb/studies/{mg_study}/instances").json()) == len(rows) - 1
    assert client.get(f"/dicomweb/studies/{mg_study}").status_code == 200  # the others serve


def test_a_job_on_a_deleted_study_fails_with_the_reason(state: Runtime, mg_study: str) -> None:
    """A queued job of a study deleted before it runs: failed at the deletion with the reason;
    one whose images went one by one fails when run (job_instances)."""
    rows = _instances(state, mg_study)
    request = jobs.JobRequest(
        study_uid=mg_study,
        cr=25.0,
        syntax="j2k",
        model="cnn3-phantom-v2",
        model_sha256="ab" * 32,
        instance_uids=tuple(r.sop_instance_uid for r in rows),
        policy_id=None,
        policy_source="requested",
        trigger=JobTrigger.API,
    )
    job, _ = jobs.submit(state.sessions, request)
    from services.core import deletion

    deletion.delete_instance(
        state.sessions,
        state.store,
        mg_study,
        rows[0].series_uid,
        rows[0].sop_instance_uid,
        actor="test",
    )
    assert run_job(state.job_context, job.id) is None
    with state.sessions() as session:
        failed = session.get(Job, job.id)
        assert failed is not None and failed.status == JobStatus.FAILED
        assert failed.reason is not None and "no longer in the store" in failed.reason

    other, _ = jobs.submit(state.sessions, request.__class__(**{**request.__dict__, "cr": 20.0}))
    deletion.delete_study(state.sessions, state.store, mg_study, actor="test")
    with state.sessions() as session:
        failed = session.get(Job, other.id)
        assert failed is not None and failed.status == JobStatus.FAILED
        assert failed.reason is not None and "no longer in the store" in failed.reason
    assert run_job(state.job_context, other.id) is None


def test_dicomweb_client_deletes_instance_series_and_study(
    live_url: str, admin_key: str, state: Runtime, mg_study: str
) -> None:
    """dicomweb-client's delete_* calls (its DELETE paths are crgate's), over a real socket."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(
        url=f"{live_url}/dicomweb", headers={"Authorization": f"Bearer {admin_key}"}
    )
    rows = _instances(state, mg_study)
    first = rows[0]
    client.delete_instance(mg_study, first.series_uid, first.sop_instance_uid)
    assert _count(state, Instance, sop_instance_uid=first.sop_instance_uid) == 0
    assert len(client.search_for_instances(mg_study)) == len(rows) - 1
    client.delete_study(mg_study)
    assert _count(state, Study, study_uid=mg_study) == 0
    assert client.search_for_studies(search_filters={"StudyInstanceUID": mg_study}) == []
    assert not (state.store.root / "instances" / mg_study).exists()
    with pytest.raises(HTTPError) as gone:
        client.delete_series(mg_study, first.series_uid)
    assert gone.value.response.status_code == 404


def test_a_study_deleted_while_its_job_runs_stays_deleted(
    client: TestClient, state: Runtime, mg_study: str
) -> None:
    """The study is deleted while a classify job reads it: whenever that happens (before its
    outputs are stored, after, or after the result), the study stays gone, the job failed."""
    from services.core import deletion

    rows = _instances(state, mg_study)
    request = jobs.JobRequest(
        study_uid=mg_study,
        cr=25.0,
        syntax="j2k",
        model="cnn3-phantom-v2",
        model_sha256="cd" * 32,
        instance_uids=tuple(r.sop_instance_uid for r in rows),
        policy_id=None,
        policy_source="requested",
        trigger=JobTrigger.API,
    )
    job, _ = jobs.submit(state.sessions, request)
    outcome: list[str | None] = []
    runner = threading.Thread(target=lambda: outcome.append(run_job(state.job_context, job.id)))
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with state.sessions() as session:
                row = session.get(Job, job.id)
                if row is not None and (row.progress_done >= 1 or row.status != "queued"):
                    break
            time.sleep(0.01)
        deletion.delete_study(state.sessions, state.store, mg_study, actor="test")
    finally:
        runner.join(120)
    assert outcome == [None] or _count(state, Result, study_uid=mg_study) == 0
    for table in (Instance, Series, Study, Result):
        assert _count(state, table, study_uid=mg_study) == 0, table.__name__
    assert not list((state.store.root / "instances").rglob("*.dcm"))
    with state.sessions() as session:
        row = session.get(Job, job.id)
        assert row is not None and row.status == JobStatus.FAILED and row.result_id is None
    results = state.store.root / "results"
    assert not results.exists() or not list(results.rglob("*.png"))
