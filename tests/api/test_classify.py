"""POST /studies/{uid}/classify end to end with the in-process queue (no broker): the real
classifier, real transcodes, outputs stored through the ingest path; and every bad request."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from sqlalchemy import select

from services.api.state import AppState
from services.core.auth import Role
from services.core.db.tables import Instance
from services.core.ingest import Channel
from services.core.phantom import PhantomConfig

MG = PhantomConfig(width=416, height=512)


def ingest_path(state: AppState, path: Path) -> str:
    staged = state.store.new_staging_path()
    shutil.copyfile(path, staged)
    return state.ingestor.ingest_file(staged, channel=Channel.STOW).study_uid


def test_classify_waits_for_the_result_and_stores_outputs(
    client: TestClient, state: AppState, mg_study: str
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
    assert len(result["images"]) == 4
    for image in result["images"]:
        assert image["achieved_cr"] == pytest.approx(25, rel=0.05)
        assert image["psnr_db"] > 30 and image["bytes_out"] < image["bytes_in"]
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
    assert response.status_code in (200, 202), response.text
    job_id = response.json()["job"]["id"]
    assert response.json()["status_url"] == f"/jobs/{job_id}"
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


def test_study_without_mammograms_is_422(client: TestClient, state: AppState) -> None:
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
