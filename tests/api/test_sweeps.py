"""`POST /studies:cr-sweep`: a CR safety study on stored studies, run as a job (in-process
queue), with its report served back; and the bad requests."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.core.auth import Role
from services.core.ingest import Channel
from services.lab.phantom import PhantomConfig, generate_study
from services.runtime import Runtime

SIZE = PhantomConfig(width=416, height=512)


@pytest.fixture(scope="session")
def labelled_studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[dict]]:  # type: ignore[type-arg]
    out = tmp_path_factory.mktemp("sweep-studies")
    files, labels = [], {}
    for index in range(4):
        study = generate_study(index, seed=99, config=SIZE)
        for view, ds in study.datasets.items():
            path = out / f"{index}-{view}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        for row in study.truth:
            key = (row.study_uid, row.laterality)
            labels[key] = labels.get(key, "normal") if row.label != "malignant" else "malignant"
    rows = [{"study_uid": s, "laterality": lat, "label": lab} for (s, lat), lab in labels.items()]
    return files, rows


def store(state: Runtime, files: list[Path]) -> None:
    for path in files:
        staged = state.store.new_staging_path()
        shutil.copyfile(path, staged)
        state.ingestor.ingest_file(staged, channel=Channel.STOW)


def body(rows: list[dict[str, Any]], **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "study_uids": sorted({r["study_uid"] for r in rows}),
        "labels": rows,
        "crs": "1,20,1000",
        "bootstrap": 100,
    }
    data.update(changes)
    return data


def test_sweep_runs_as_a_job_and_serves_its_report(
    client: TestClient,
    state: Runtime,
    labelled_studies: tuple[list[Path], list[dict]],  # type: ignore[type-arg]
) -> None:
    files, rows = labelled_studies
    store(state, files)
    response = client.post("/studies:cr-sweep", json=body(rows))
    assert response.status_code == 202, response.text
    status_url = response.json()["status_url"]
    deadline = time.monotonic() + 240
    view = client.get(status_url).json()
    while view["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.3)
        view = client.get(status_url).json()
    assert view["status"] == "succeeded", view
    recommendation = view["summary"]["recommendation"]
    # a handful of breasts is far below the power calculation's minimum: no recommendation
    assert (recommendation["status"], recommendation["cr"]) == ("no-recommendation", None)
    assert "too few breasts" in recommendation["message"]
    assert view["progress"]["done"] == view["progress"]["total"] > 0
    results = client.get(f"/sweeps/{view['id']}/report/results.json")
    assert results.status_code == 200
    data = json.loads(results.content)
    assert [m["cr"] for m in data["per_cr"]] == [1.0, 20.0, 1000.0]
    for m in data["per_cr"]:
        assert 0.0 <= m["auroc"]["value"] <= 1.0
    html = client.get(view["report_url"])
    assert html.status_code == 200 and b"CR safety study" in html.content
    assert client.get(f"/sweeps/{view['id']}/report/..%2Fcrgate.db").status_code == 404


def test_bad_sweep_requests(
    client: TestClient,
    state: Runtime,
    labelled_studies: tuple[list[Path], list[dict]],  # type: ignore[type-arg]
) -> None:
    files, rows = labelled_studies
    store(state, files[:4])  # the first study only
    first = rows[0]["study_uid"]
    mine = [r for r in rows if r["study_uid"] == first]
    cases = [
        (body(rows), 404, "in the store"),  # studies that were never stored
        (body(mine, crs="1,0,20"), 422, "CR"),
        (body(mine, crs="1,-5"), 422, "CR"),
        (body(mine, model="no-such-model"), 404, "no model"),
        (body(mine, study_uids=[first], labels=rows), 422, "not in study_uids"),
        (body(mine, bootstrap=5), 422, "bootstrap"),
        (body(mine, study_uids=["../etc"]), 422, "not a valid DICOM UID"),
    ]
    for request, status, text in cases:
        response = client.post("/studies:cr-sweep", json=request)
        assert response.status_code == status, (request, response.text)
        assert text in response.text


def test_unknown_sweep_is_404_and_viewers_are_refused(
    client: TestClient, anon_client: TestClient, make_key: Callable[..., str]
) -> None:
    assert client.get("/sweeps/nope").status_code == 404
    viewer = {"Authorization": f"Bearer {make_key(Role.VIEWER)}"}
    assert anon_client.post("/studies:cr-sweep", json={}, headers=viewer).status_code == 403
