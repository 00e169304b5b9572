"""POST /studies/{uid}/classify end to end with the in-process queue (no broker): the real
classifier, real transcodes, outputs stored through the ingest path; and every bad request."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import UID, JPEG2000Lossless
from sqlalchemy import delete, select, update

from services.core import classify, jobs
from services.core.auth import Role
from services.core.classify import prepare
from services.core.contracts import JobTrigger
from services.core.db.tables import Instance, Job, Result
from services.core.dicom.uids import new_uid
from services.core.dicom.values import as_strings
from services.core.ingest import Channel
from services.core.policies import PolicyKey, set_policy
from services.core.ratio import CompressionRatio
from services.core.runner import run_job
from services.lab.phantom import PhantomConfig, generate_study
from services.runtime import Runtime
from tests.conftest import HeldQueue

MG = PhantomConfig(width=416, height=512)


def ingest_path(state: Runtime, path: Path) -> str:
    staged = state.store.new_staging_path()
    shutil.copyfile(path, staged)
    return state.ingestor.ingest_file(staged, channel=Channel.STOW).study_uid


def test_classify_waits_for_the_result_and_stores_outputs(
    client: TestClient, state: Runtime, mg_study: str
) -> None:
    response = client.post(f"/studies/{mg_study}/classify", params={"cr": 25, "wait": 120})
    assert response.status_code == 200, response.text
    body = response.json()
    job, result = body["job"], body["result"]
    assert job["status"] == "succeeded" and job["progress"] == {"done": 4, "total": 4}
    assert result["applied_cr"] == 25 and result["requested_cr"] == 25
    assert result["policy"] == "requested"
    assert result["model"]["sha256"] == job["model_sha256"]
    assert {b["laterality"] for b in result["breasts"]} == {"L", "R"}
    for breast in result["breasts"]:
        assert 0.0 <= breast["probability"] <= 1.0
        assert 0.0 <= breast["probability_original"] <= 1.0
        assert breast["change"] == pytest.approx(
            breast["probability"] - breast["probability_original"], abs=1e-9
        )
        assert breast["saliency_method"] == result["saliency_method"]
    assert result["saliency_method"] in ("hirescam", "gradcam", "occlusion")
    assert len(result["images"]) == 4
    for image in result["images"]:
        assert image["achieved_cr"] == pytest.approx(25, rel=0.05)
        assert image["psnr_db"] > 30 and image["bytes_out"] < image["bytes_in"]
        assert image["achieved_cr"] == pytest.approx(image["bytes_in"] / image["bytes_out"])
        assert image["bytes_in"] == 416 * 512 * 2
        assert 0.5 < image["ssim"] <= 1.0 and image["max_abs_error"] > 0
    timings = result["timings_ms"]
    assert set(timings) == {"classify", "outputs", "total"}
    assert 0 < timings["classify"] <= timings["total"] and timings["outputs"] > 0
    derived_uids = {r["sop_instance_uid"] for r in result["outputs"]["derived"]}
    assert {i["output_sop_instance_uid"] for i in result["images"]} == derived_uids
    outputs = result["outputs"]
    assert len(outputs["derived"]) == 4 and len(outputs["overlays"]) == 4
    assert outputs["report"]["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.88.33"
    with state.sessions() as session:
        made = session.scalars(select(Instance).where(Instance.channel == "worker")).all()
    assert len(made) == 9 and all(i.study_uid == mg_study for i in made)

    uid = result["images"][0]["input_sop_instance_uid"]
    png = client.get(f"/studies/{mg_study}/results/{result['result_id']}/overlays/{uid}.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    listed = client.get(f"/studies/{mg_study}/results").json()
    assert [r["result_id"] for r in listed] == [result["result_id"]]


def test_classify_in_htj2k_stores_htj2k_copies(
    client: TestClient, state: Runtime, mg_study: str
) -> None:
    response = client.post(
        f"/studies/{mg_study}/classify", params={"cr": 25, "syntax": "htj2k", "wait": 120}
    )
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert response.json()["job"]["syntax"] == "htj2k"
    for image in result["images"]:
        assert image["output_syntax"] == "1.2.840.10008.1.2.4.203"
        assert image["achieved_cr"] == pytest.approx(25, rel=0.02) and image["psnr_db"] > 30
    uid = result["outputs"]["derived"][0]["sop_instance_uid"]
    with state.sessions() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).one()
    copy = pydicom.dcmread(state.store.absolute(row.path))
    assert copy.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.203"
    assert as_strings(copy.get("LossyImageCompressionMethod"))[-1] == "ISO_15444_15"
    assert copy.SeriesDescription == "crgate HTJ2K CR 25"
    assert copy.pixel_array.shape == (512, 416)


def test_an_unknown_syntax_is_refused_naming_the_choices(client: TestClient, mg_study: str) -> None:
    response = client.post(f"/studies/{mg_study}/classify", params={"cr": 25, "syntax": "jphc"})
    assert response.status_code == 422
    assert "htj2k" in response.json()["detail"]


def test_asking_twice_gives_the_same_job_without_recomputing(
    client: TestClient, mg_study: str
) -> None:
    first = client.post(f"/studies/{mg_study}/classify", params={"cr": 20, "wait": 120}).json()
    again = client.post(f"/studies/{mg_study}/classify", params={"cr": 20}).json()
    assert again["job"]["id"] == first["job"]["id"]
    assert again["job"]["attempts"] == 1
    assert again["result"]["result_id"] == first["result"]["result_id"]


def test_without_wait_answers_202_with_a_status_url(client: TestClient, mg_study: str) -> None:
    response = client.post(f"/studies/{mg_study}/classify", params={"cr": 1})
    assert response.status_code == 202, response.text
    job_id = response.json()["job"]["id"]
    assert response.json()["job"]["status"] in ("queued", "running")
    assert response.json()["status_url"] == f"/jobs/{job_id}"
    assert response.headers["location"] == f"/jobs/{job_id}"
    status = client.get(f"/jobs/{job_id}")
    assert status.status_code == 200 and status.json()["id"] == job_id


@pytest.mark.parametrize("cr", ["abc", "0", "-5", "nan", "1e9"])
def test_bad_cr_is_422(client: TestClient, mg_study: str, cr: str) -> None:
    response = client.post(f"/studies/{mg_study}/classify", params={"cr": cr})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")


def test_unknown_study_is_404(client: TestClient) -> None:
    response = client.post("/studies/1.2.3.4.5/classify", params={"cr": 25})
    assert response.status_code == 404
    assert "no study 1.2.3.4.5" in response.json()["detail"]


def test_bad_study_uid_is_refused(client: TestClient) -> None:
    response = client.post("/studies/1.2.x/classify", params={"cr": 25})
    assert response.status_code == 422


def test_study_without_mammograms_is_422(client: TestClient, state: Runtime) -> None:
    uid = ingest_path(state, Path(str(get_testdata_file("CT_small.dcm"))))
    response = client.post(f"/studies/{uid}/classify", params={"cr": 25})
    assert response.status_code == 422
    assert "no image the model" in response.json()["detail"]


def test_unknown_model_is_422(client: TestClient, mg_study: str) -> None:
    response = client.post(f"/studies/{mg_study}/classify", params={"cr": 25, "model": "nope"})
    assert response.status_code == 422
    assert "installed models" in response.json()["detail"]


def test_unknown_job_and_result_are_404(client: TestClient, mg_study: str) -> None:
    assert client.get("/jobs/does-not-exist").status_code == 404
    assert client.get(f"/studies/{mg_study}/results/nope").status_code == 404


def test_viewer_cannot_start_a_job(
    anon_client: TestClient, make_key: Callable[..., str], mg_study: str
) -> None:
    response = anon_client.post(
        f"/studies/{mg_study}/classify",
        params={"cr": 25},
        headers={"Authorization": f"Bearer {make_key(Role.VIEWER)}"},
    )
    assert response.status_code == 403


def test_a_cr_above_the_ceiling_needs_an_admin_and_a_reason_and_is_audited(
    client: TestClient,
    anon_client: TestClient,
    make_key: Callable[..., str],
    state: Runtime,
    mg_study: str,
) -> None:
    """Found as an operator would: any operator could classify at CR 500 and store that copy
    in the patient's study. RCR's MG/BREAST maximum is 20."""
    assert client.post("/policies/presets/RCR").status_code == 200
    operator = {"Authorization": f"Bearer {make_key(Role.OPERATOR)}"}
    refused = anon_client.post(
        f"/studies/{mg_study}/classify", params={"cr": 500}, headers=operator
    )
    assert refused.status_code == 403, refused.text
    problem = refused.json()
    assert "above the maximum 20 set by preset RCR" in problem["detail"]
    assert (problem["max_cr"], problem["preset"]) == (20, "RCR")
    within = anon_client.post(f"/studies/{mg_study}/classify", params={"cr": 20}, headers=operator)
    assert within.status_code == 202, within.text

    no_reason = client.post(f"/studies/{mg_study}/classify", params={"cr": 500})
    assert no_reason.status_code == 422 and "give a reason" in no_reason.json()["detail"]
    granted = client.post(
        f"/studies/{mg_study}/classify", params={"cr": 500, "reason": "reader study arm B"}
    )
    assert granted.status_code == 202, granted.text
    job_id = granted.json()["job"]["id"]
    (entry,) = client.get("/audit", params={"entity": "job"}).json()["items"]
    assert (entry["action"], entry["entity_id"], entry["reason"]) == (
        "override",
        job_id,
        "reader study arm B",
    )
    assert entry["after"]["cr"] == 500 and entry["after"]["max_cr"] == 20
    assert entry["actor"] == "first admin (admin.key)"


def worker_objects(state: Runtime) -> set[str]:
    with state.sessions() as session:
        rows = session.scalars(select(Instance).where(Instance.channel == "worker")).all()
    return {r.sop_instance_uid for r in rows}


def test_a_retried_job_stores_one_set_of_outputs(
    client: TestClient, state: Runtime, mg_study: str
) -> None:
    """A worker died after storing the outputs, before the result: the retry (attempt 2)
    stores the same objects again, and the SR names the result the retry made."""
    first = client.post(f"/studies/{mg_study}/classify", params={"cr": 25, "wait": 120}).json()
    job_id, outputs = first["job"]["id"], first["result"]["outputs"]
    made = worker_objects(state)
    assert len(made) == 9
    with state.sessions() as session, session.begin():  # as the stale-job sweep finds it
        session.execute(delete(Result).where(Result.job_id == job_id))
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status="running",
                result_id=None,
                finished_at=None,
                worker="dead:1",
                heartbeat_at=jobs.now() - timedelta(minutes=5),
            )
        )
    result_id = run_job(state.job_context, job_id)
    assert result_id is not None and result_id != first["result"]["result_id"]
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "succeeded" and view["attempts"] == 2
    assert worker_objects(state) == made
    (result,) = client.get(f"/studies/{mg_study}/results").json()
    assert result["result_id"] == result_id and result["outputs"] == outputs
    report = outputs["report"]
    path = state.store.relative_path(mg_study, report["series_uid"], report["sop_instance_uid"])
    sr = pydicom.dcmread(state.store.absolute(path))
    assert result_id in {str(item.get("TextValue", "")) for item in sr.ContentSequence}


def _submit(state: Runtime, study_uid: str, *, cr: float) -> tuple[list[str], Job]:
    """A classification job asked for as the API asks, queued but not run; and the instances
    it was made for."""
    job, _ = classify.request(
        state.job_context,
        HeldQueue(),
        study_uid,
        cr=CompressionRatio(cr),
        syntax=None,
        model=None,
        trigger=JobTrigger.API,
        requested_by=None,
    )
    assert job.instance_uids is not None
    return list(job.instance_uids), job


def test_a_job_classifies_exactly_the_instances_it_was_made_for(
    state: Runtime, mg_study: str, mg_study_files: list[Path], tmp_path: Path
) -> None:
    instance_uids, job = _submit(state, mg_study, cr=25)
    late = pydicom.dcmread(mg_study_files[0])  # a fifth view arrives before the job runs
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = UID(new_uid())
    late.InstanceNumber = 5
    late.save_as(tmp_path / "late.dcm", enforce_file_format=True)
    assert ingest_path(state, tmp_path / "late.dcm") == mg_study
    result_id = run_job(state.job_context, job.id)
    assert result_id is not None
    with state.sessions() as session:
        row = session.get(Result, result_id)
        assert row is not None
        read = [image["input_sop_instance_uid"] for image in row.payload["images"]]
    assert sorted(read) == sorted(instance_uids) and len(read) == 4
    assert str(late.SOPInstanceUID) not in read


def test_a_job_whose_images_left_the_store_fails_with_the_reason(
    state: Runtime, mg_study: str
) -> None:
    instance_uids, job = _submit(state, mg_study, cr=25)
    gone = instance_uids[0]
    with state.sessions() as session, session.begin():
        session.execute(delete(Instance).where(Instance.sop_instance_uid == gone))
    assert run_job(state.job_context, job.id) is None
    with state.sessions() as session:
        row = jobs.get_job(session, job.id)
        assert row.status == "failed"
        assert row.reason is not None and gone in row.reason and "ask again" in row.reason


def test_a_corrupt_mammogram_fails_the_job_with_a_readable_reason(
    client: TestClient, state: Runtime, mg_study_files: list[Path], tmp_path: Path
) -> None:
    """A permanent failure: the job fails at once (no retry), with why, over the API."""
    for index, path in enumerate(mg_study_files):
        ds = pydicom.dcmread(path)
        if index == 0:  # a JPEG 2000 image whose codestream is cut after the SIZ marker
            corrupt_uid = str(ds.SOPInstanceUID)
            ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
            ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.save_as(tmp_path / path.name, enforce_file_format=True)
        study_uid = ingest_path(state, tmp_path / path.name)
    response = client.post(f"/studies/{study_uid}/classify", params={"cr": 25, "wait": 120})
    assert response.status_code == 202, response.text
    job_id = response.json()["job"]["id"]
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "failed" and view["attempts"] == 1 and view["result_id"] is None
    assert view["reason"].startswith(f"{corrupt_uid}: cannot decode pixel data")
    assert client.get(f"/studies/{study_uid}/results").json() == []
    assert worker_objects(state) == set()


def test_pediatric_policy_applies_to_a_pediatric_study(
    state: Runtime, mg_study: str, tmp_path: Path
) -> None:
    with state.sessions() as session, session.begin():
        set_policy(session, PolicyKey.of("MG"), {"cr": 20}, actor="test")
        set_policy(session, PolicyKey.of("MG", None, True), {"cr": 8}, actor="test")
    study = generate_study(5, seed=11, config=PhantomConfig(width=128, height=160))
    for view, ds in study.datasets.items():
        ds.PatientAge = "012Y"
        ds.save_as(tmp_path / f"{view}.dcm", enforce_file_format=True)
        ingest_path(state, tmp_path / f"{view}.dcm")

    def policy_of(study_uid: str) -> tuple[float, str]:
        request, _ = prepare(
            state.job_context,
            study_uid,
            cr=None,
            syntax=None,
            model=None,
            trigger=JobTrigger.API,
            requested_by=None,
        )
        return request.cr, request.policy_source

    cr, source = policy_of(study.study_uid)
    assert cr == 8 and "pediatric" in source
    cr, source = policy_of(mg_study)  # adults (40 to 76 years)
    assert cr == 20 and "pediatric" not in source


def test_a_research_copy_above_the_ceiling_stays_out_of_the_study(
    client: TestClient, state: Runtime, mg_study: str
) -> None:
    """store=false: the result and its overlay PNGs, no object in the patient's study."""
    with state.sessions() as session, session.begin():
        set_policy(session, PolicyKey.of("MG"), {"cr": 10}, actor="test")
        from services.core.policies import apply_preset

        apply_preset(session, "RCR", actor="test")  # MG/BREAST at most 20
    params = {"cr": 100, "reason": "reader study", "store": "false", "wait": 120}
    response = client.post(f"/studies/{mg_study}/classify", params=params)
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert result["outputs"] == {"stored_in_study": False}
    assert response.json()["job"]["options"] == {"store": False}
    with state.sessions() as session:
        made = session.scalars(
            select(Instance).where(
                Instance.study_uid == mg_study, Instance.channel == Channel.WORKER.value
            )
        ).all()
    assert made == []
    for sop_uid in result["overlays"]:
        png = client.get(
            f"/studies/{mg_study}/results/{result['result_id']}/overlays/{sop_uid}.png"
        )
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
