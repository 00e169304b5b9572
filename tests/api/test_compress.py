"""POST /studies/{uid}/compress and the policies' compress action, end to end with the
in-process queue: a mixed study (a CT series, a US cine loop, and images the transcoder cannot
code) compressed at a CR, per policy, kept out of the study, over the ceiling; real transcodes,
outputs stored through the ingest path and read back."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select

from services.core.arrivals import ArrivalTracker
from services.core.auth import Role
from services.core.db.tables import AuditEntry, Instance
from services.core.dicom.uids import new_uid
from services.core.dicom.values import as_strings
from services.core.ingest import Channel
from services.core.policies import PolicyKey, apply_preset, set_policy
from services.runtime import Runtime

CT_SLICES = 3
US_FRAMES = 30  # examples_ybr_color.dcm: a 30-frame YBR US cine loop


def _testdata(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, name
    return pydicom.dcmread(path)


def _into_study(ds: Dataset, study_uid: str, series_uid: str, number: int) -> Dataset:
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = number
    ds.PatientID = "CMP-1"
    ds.PatientName = "Compress^Test"
    ds.PatientAge = "045Y"  # one adult patient (the test files come from several)
    return ds


def mixed_study(folder: Path) -> tuple[str, list[Path]]:
    """One study: 3 CT slices (16-bit signed), a US cine loop (30 frames, colour), and three
    images crgate cannot code: palette colour (US), 1-bit (SEG), 32-bit (RT dose)."""
    study_uid = new_uid()
    datasets = []
    ct_series = new_uid()
    for number in range(1, CT_SLICES + 1):
        ds = _into_study(_testdata("CT_small.dcm"), study_uid, ct_series, number)
        ds.BodyPartExamined = "HEAD"
        ds.PixelData = (ds.pixel_array + number * 7).astype(ds.pixel_array.dtype).tobytes()
        datasets.append(ds)
    datasets.append(_into_study(_testdata("examples_ybr_color.dcm"), study_uid, new_uid(), 1))
    datasets.append(_into_study(_testdata("examples_palette.dcm"), study_uid, new_uid(), 1))
    datasets.append(_into_study(_testdata("liver_1frame.dcm"), study_uid, new_uid(), 1))
    datasets.append(_into_study(_testdata("rtdose_1frame.dcm"), study_uid, new_uid(), 1))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(datasets):
        path = folder / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, paths


@pytest.fixture
def study(state: Runtime, tmp_path: Path) -> str:
    uid, paths = mixed_study(tmp_path / "in")
    for path in paths:
        staged = state.store.new_staging_path()
        staged.write_bytes(path.read_bytes())
        assert state.ingestor.ingest_file(staged, channel=Channel.STOW).study_uid == uid
    return uid


def compress(client: TestClient, study: str, **params: Any) -> Any:
    response = client.post(f"/studies/{study}/compress", params={"wait": 120, **params})
    assert response.status_code == 200, response.text
    return response.json()


def derived_instances(state: Runtime, study: str) -> list[Instance]:
    with state.sessions() as session:
        return list(
            session.scalars(
                select(Instance).where(
                    Instance.study_uid == study, Instance.channel == Channel.WORKER.value
                )
            )
        )


def test_compress_codes_every_image_and_skips_what_it_cannot_with_the_reason(
    client: TestClient, state: Runtime, study: str
) -> None:
    (entry,) = compress(client, study, cr=10)["jobs"]
    job, result = entry["job"], entry["result"]
    assert job["kind"] == "compress" and job["status"] == "succeeded" and job["model"] is None
    assert job["progress"] == {"done": 7, "total": 7}
    assert result["kind"] == "compress" and "breasts" not in result
    assert result["applied_cr"] == 10 and result["policy"] == "requested"
    images = {i["modality"]: i for i in result["images"]}
    assert len(result["images"]) == CT_SLICES + 1 and set(images) == {"CT", "US"}
    assert images["US"]["frames"] == US_FRAMES and images["CT"]["frames"] == 1
    assert result["summary"]["frames"] == CT_SLICES + US_FRAMES
    for image in result["images"]:
        assert image["output_sop_instance_uid"] != image["input_sop_instance_uid"]
        assert image["achieved_cr"] == pytest.approx(10, rel=0.02) or image["note"]
        assert image["psnr_db"] > 30 and image["ssim"] > 0.8
        # lossy, or the lossless encode when it fits the CR's byte budget (the YBR cine does)
        assert (image["max_abs_error"] == 0) == image["lossless"], image
        assert image["bytes_out"] < image["bytes_in"]
    reasons = {s["modality"]: s["reason"] for s in result["skipped"]}
    assert set(reasons) == {"US", "SEG", "RTDOSE"}, reasons
    assert "PALETTE COLOR" in reasons["US"]
    assert "Bits Allocated 1" in reasons["SEG"] and "Bits Allocated 32" in reasons["RTDOSE"]
    # the copies are in the study: one derived series per source series, lossy, new UIDs
    stored = derived_instances(state, study)
    assert {i.sop_instance_uid for i in stored} == {
        i["output_sop_instance_uid"] for i in result["images"]
    }
    assert len({i.series_uid for i in stored}) == 2
    ct_numbers = sorted(i.instance_number or 0 for i in stored if i.rows == 128)
    assert ct_numbers == list(range(1, CT_SLICES + 1))  # each copy at its original's place
    assert {r["sop_instance_uid"] for r in result["outputs"]["derived"]} == {
        i.sop_instance_uid for i in stored
    }
    for instance in stored:
        ds = pydicom.dcmread(state.store.absolute(instance.path))
        assert ds.LossyImageCompression == "01"  # CT coded lossy; the US was JPEG baseline
        assert ds.file_meta.TransferSyntaxUID in (
            "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.4.91",
        )
        assert ds.SeriesDescription.startswith("crgate JPEG 2000")
        assert ds.get("NumberOfFrames", 1) in (1, US_FRAMES)


def test_the_stored_copy_decodes_to_the_pixels_the_result_measured(
    client: TestClient, state: Runtime, study: str
) -> None:
    (entry,) = compress(client, study, cr=8, syntax="htj2k")["jobs"]
    ct = next(i for i in entry["result"]["images"] if i["modality"] == "CT")
    with state.sessions() as session:
        original = session.get(Instance, ct["input_sop_instance_uid"])
        copy = session.get(Instance, ct["output_sop_instance_uid"])
        assert original is not None and copy is not None
    a = pydicom.dcmread(state.store.absolute(original.path)).pixel_array.astype(np.int64)
    copy_ds = pydicom.dcmread(state.store.absolute(copy.path))
    assert copy_ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.203"
    assert as_strings(copy_ds.LossyImageCompressionMethod)[-1] == "ISO_15444_15"
    b = copy_ds.pixel_array.astype(np.int64)
    assert int(np.abs(a - b).max()) == ct["max_abs_error"]


def test_without_cr_each_policy_compresses_its_own_images(
    client: TestClient, state: Runtime, study: str
) -> None:
    with state.sessions() as session, session.begin():
        set_policy(session, PolicyKey.of("CT", "HEAD"), {"cr": 6}, actor="test")
        set_policy(session, PolicyKey.of("US"), {"cr": 12, "syntax": "htj2k"}, actor="test")
    body = compress(client, study)
    by_cr = {e["result"]["applied_cr"]: e["result"] for e in body["jobs"]}
    default = state.settings.default_cr  # SEG and RT dose fall under the default policy
    assert set(by_cr) == {6, 12, default}, by_cr
    assert by_cr[default]["images"] == []
    assert {s["modality"] for s in by_cr[default]["skipped"]} == {"SEG", "RTDOSE"}
    assert {i["modality"] for i in by_cr[6]["images"]} == {"CT"}
    assert {i["modality"] for i in by_cr[12]["images"]} == {"US"}
    assert by_cr[12]["syntax"] == "htj2k" and by_cr[6]["policy"].startswith("policy ")
    again = compress(client, study)  # the same request: the same jobs, nothing new
    assert sorted(e["job"]["id"] for e in again["jobs"]) == sorted(
        e["job"]["id"] for e in body["jobs"]
    )


def test_keep_copy_false_leaves_the_study_as_it_was(
    client: TestClient, state: Runtime, study: str
) -> None:
    (entry,) = compress(client, study, cr=20, store="false")["jobs"]
    result = entry["result"]
    assert result["outputs"]["stored_in_study"] is False and result["outputs"]["derived"] == []
    assert derived_instances(state, study) == []
    copies = state.job_context.results_dir(result["result_id"]) / "copies"
    assert len(list(copies.glob("*.dcm"))) == len(result["images"])
    for path in copies.glob("*.dcm"):
        assert path.stat().st_mode & 0o077 == 0  # patient data: 0600


def test_over_the_ceiling_needs_an_admin_and_a_reason(
    client: TestClient, state: Runtime, study: str, make_key: Callable[..., str]
) -> None:
    with state.sessions() as session, session.begin():
        apply_preset(session, "RCR", actor="test")  # CT HEAD 5, US 10
    operator = {"Authorization": f"Bearer {make_key(Role.OPERATOR)}"}
    refused = client.post(f"/studies/{study}/compress", params={"cr": 9}, headers=operator)
    assert refused.status_code == 403, refused.text
    assert refused.json()["max_cr"] == 5 and "admin" in refused.json()["detail"]
    no_reason = client.post(f"/studies/{study}/compress", params={"cr": 9})
    assert no_reason.status_code == 422 and "reason" in no_reason.json()["detail"]
    (entry,) = compress(client, study, cr=9, reason="phantom research", store="false")["jobs"]
    with state.sessions() as session:
        override = session.scalars(
            select(AuditEntry).where(
                AuditEntry.action == "override", AuditEntry.entity_id == entry["job"]["id"]
            )
        ).one()
    assert override.reason == "phantom research" and override.after["kind"] == "compress"
    within = client.post(f"/studies/{study}/compress", params={"cr": 5}, headers=operator)
    assert within.status_code in (200, 202), within.text


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"cr": 0}, 422, "compression ratio"),
        ({"cr": 10, "syntax": "jpeg"}, 422, "htj2k"),
        ({"cr": 10, "wait": 9999}, 422, "wait"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(
    client: TestClient, study: str, params: dict[str, Any], status: int, words: str
) -> None:
    response = client.post(f"/studies/{study}/compress", params=params)
    assert response.status_code == status, response.text
    assert words in response.text.lower()


def test_unknown_study_and_study_without_images(client: TestClient, state: Runtime) -> None:
    assert client.post(f"/studies/{new_uid()}/compress", params={"cr": 10}).status_code == 404
    sr = Dataset()  # a Basic Text SR: no image, nothing to compress
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = new_uid()
    sr.StudyInstanceUID, sr.SeriesInstanceUID = new_uid(), new_uid()
    sr.Modality, sr.PatientID, sr.ValueType = "SR", "SR-1", "CONTAINER"
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    staged = state.store.new_staging_path()
    staged.write_bytes(buffer.getvalue())
    uid = state.ingestor.ingest_file(staged, channel=Channel.STOW).study_uid
    response = client.post(f"/studies/{uid}/compress", params={"cr": 10})
    assert response.status_code == 422 and "no image to compress" in response.text


def test_viewer_cannot_compress(
    client: TestClient, study: str, make_key: Callable[..., str]
) -> None:
    viewer = {"Authorization": f"Bearer {make_key(Role.VIEWER)}"}
    response = client.post(f"/studies/{study}/compress", params={"cr": 10}, headers=viewer)
    assert response.status_code == 403


def test_a_complete_study_is_compressed_by_its_policy(
    client: TestClient, state: Runtime, tmp_path: Path
) -> None:
    """The arrival tracker: a CT policy that compresses, expecting 3 slices."""
    with state.sessions() as session, session.begin():
        set_policy(
            session,
            PolicyKey.of("CT"),
            {"cr": 8, "auto_compress": True, "expected_instances": 3, "quiet_seconds": 3600},
            actor="test",
        )
    uid, paths = mixed_study(tmp_path / "in")
    tracker = ArrivalTracker(state.job_context, state.queue)
    for path in paths[:2]:
        staged = state.store.new_staging_path()
        staged.write_bytes(path.read_bytes())
        state.ingestor.ingest_file(staged, channel=Channel.STOW)
    assert tracker.housekeeping() == []  # 2 of 3 CT slices
    for path in paths[2:]:
        staged = state.store.new_staging_path()
        staged.write_bytes(path.read_bytes())
        state.ingestor.ingest_file(staged, channel=Channel.STOW)
    (job_id,) = tracker.housekeeping()
    deadline = time.monotonic() + 120
    while not (view := client.get(f"/jobs/{job_id}").json())["done"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert view["kind"] == "compress" and view["trigger"] == "arrival", view
    (result,) = client.get(f"/studies/{uid}/results").json()
    assert result["applied_cr"] == 8 and {i["modality"] for i in result["images"]} == {"CT"}
    assert len(result["images"]) == CT_SLICES
    assert tracker.housekeeping() == []  # settled: nothing made twice


def test_policy_actions_are_checked(client: TestClient) -> None:
    ct = client.post("/policies", json={"modality": "CT", "cr": 8, "auto_classify": True})
    assert ct.status_code == 422 and "MG" in ct.json()["detail"]
    unknown = client.post("/policies", json={"modality": "CT", "cr": 8, "forward_to": ["nope"]})
    assert unknown.status_code == 422 and "destination" in unknown.json()["detail"]
    what = client.post(
        "/policies", json={"modality": "CT", "cr": 8, "forward_what": ["everything"]}
    )
    assert what.status_code == 422
    made = client.post(
        "/policies", json={"modality": "CT", "cr": 8, "auto_compress": True, "keep_copy": False}
    )
    assert made.status_code == 201, made.text
    assert made.json()["auto_compress"] is True and made.json()["keep_copy"] is False
    changed = client.put(f"/policies/{made.json()['id']}", json={"keep_copy": True})
    assert changed.json()["keep_copy"] is True
