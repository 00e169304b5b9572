"""Hostile request parameters get a 4xx problem naming the parameter, never a 500.

Each case was a 500 once (issue 16): ``str.isdigit`` accepts superscript digits that ``int``
refuses, integers above 2^63 overflow SQLite and PostgreSQL, and PostgreSQL refuses NUL in text.
Run on SQLite and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient

from services.core.ingest import Channel
from services.runtime import Runtime

PROBLEM = "application/problem+json"
HUGE = "99999999999999999999"  # above 2^63
FRAMES = "/dicomweb/studies/1.2/series/1.3/instances/1.4/frames/"


def assert_refused(client: TestClient, url: str, status: int, *named: str) -> None:
    response = client.get(url)
    assert response.status_code == status, (url, response.status_code, response.text)
    assert response.headers["content-type"] == PROBLEM
    detail = response.json()["detail"]
    for name in named:
        assert name in detail, (url, detail)


@pytest.mark.parametrize("name", ["limit", "offset"])
@pytest.mark.parametrize("value", ["%C2%B2", "%EF%BC%95", HUGE, "-1", "1e3", ""])
def test_qido_paging_parameters_must_be_plain_integers(
    client: TestClient, name: str, value: str
) -> None:
    assert_refused(client, f"/dicomweb/studies?{name}={value}", 400, name)


def test_qido_paging_at_the_int64_limit_is_answered(client: TestClient) -> None:
    response = client.get(f"/dicomweb/studies?limit={2**63 - 1}&offset={2**63 - 1}")
    assert response.status_code == 200, response.text
    assert response.json() == []


@pytest.mark.parametrize("frames", ["%C2%B2", "1,%C2%B9", HUGE, "0", "1,,2"])
def test_malformed_frame_lists_are_400(client: TestClient, frames: str) -> None:
    assert_refused(client, FRAMES + frames, 400, "frame")


def test_policy_id_beyond_the_column_is_refused_naming_it(client: TestClient) -> None:
    assert_refused(client, f"/policies/{HUGE}", 422, "policy_id")
    assert_refused(client, f"/policies/{2**31}", 422, "policy_id")
    assert client.put(f"/policies/{HUGE}", json={"cr": 10}).status_code == 422
    assert client.delete(f"/policies/{HUGE}").status_code == 422
    assert_refused(client, f"/audit?offset={HUGE}", 422, "offset")


@pytest.mark.parametrize(
    ("url", "status", "name"),
    [
        ("/dicomweb/studies?PatientID=a%00b", 400, "PatientID"),
        ("/dicomweb/studies?PatientName=a%00*", 400, "PatientName"),
        ("/dicomweb/studies?Patient%00ID=a", 400, "query parameter"),
        ("/dicomweb/series?includefield=%00", 400, "includefield"),
        ("/jobs/ab%00c", 422, "job_id"),
        ("/studies/1.2/results/ab%00c", 422, "result_id"),
        ("/studies/1.2/results/ab%00c/overlays/1.2.png", 422, "result_id"),
        ("/policies/resolve?modality=M%00G", 422, "modality"),
    ],
)
def test_nul_bytes_in_parameters_are_refused_naming_them(
    client: TestClient, url: str, status: int, name: str
) -> None:
    assert_refused(client, url, status, name, "NUL")


@pytest.mark.parametrize(
    "query", ["SeriesNumber=9999999999", "SeriesNumber=-9999999999", "InstanceNumber=4294967296"]
)
def test_integer_matching_keys_beyond_is_range_are_400(client: TestClient, query: str) -> None:
    level = "instances" if query.startswith("Instance") else "series"
    assert_refused(client, f"/dicomweb/{level}?{query}", 400, query.split("=")[0], "VR IS")


def test_a_frame_list_repeats_each_frame_once_and_is_capped(
    client: TestClient, state: Runtime, tiny_study_files: list[Path]
) -> None:
    """``frames/1,1,1,...`` once built a response 40 times the pixel data (5,000 times: 500)."""
    ds = pydicom.dcmread(tiny_study_files[0])
    staged = state.store.new_staging_path()
    staged.write_bytes(tiny_study_files[0].read_bytes())
    state.ingestor.ingest_file(staged, channel=Channel.STOW)
    url = (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/"
    )
    accept = {"Accept": 'multipart/related; type="application/octet-stream"'}
    once = client.get(url + "1", headers=accept)
    repeated = client.get(url + ",".join(["1"] * 5000), headers=accept)
    assert once.status_code == repeated.status_code == 200, repeated.text
    assert len(repeated.content) == len(once.content) < 2 * len(ds.PixelData)
    numbers = ",".join(str(n) for n in range(1, 1002))
    assert_refused(client, url + numbers, 413, "1001 frames", "CRGATE_MAX_FRAMES_PER_REQUEST")
