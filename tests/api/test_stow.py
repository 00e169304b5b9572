"""STOW-RS against the real app, store and databases: good parts, bad parts, bad requests."""

from __future__ import annotations

import asyncio
import io
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from sqlalchemy import func, select

from services.api.dicomweb import stow as stow_routes
from services.core.config import DuplicatePolicy
from services.core.db.tables import Instance
from services.core.dicom.multipart import iter_multipart
from services.core.dicom.uids import new_uid
from services.core.pipeline import transcode_file
from services.runtime import Runtime

BOUNDARY = "crgate-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
RETRIEVE_URL = "00081190"
FAILURE_REASON = "00081197"
ERROR_COMMENT = "00000902"
SOP_INSTANCE = "00081155"
SOP_CLASS = "00081150"
WARNING_REASON = "00081196"


# -- helpers (test_qido.py uses them too) ----------------------------------------------------------


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deliberately invalid values in some tests
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def variant(path: Path, **changes: Any) -> Dataset:
    """The file at ``path`` with attributes changed (a keyword set to None is deleted)."""
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID" and value is not None:
            ds.file_meta.MediaStorageSOPInstanceUID = value
    return ds


def new_study(paths: list[Path], **changes: Any) -> list[Dataset]:
    """Copies of ``paths`` as a new study (new Study/Series/SOP UIDs) with ``changes``."""
    study, series = new_uid(), new_uid()
    return [
        variant(
            p, StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=new_uid(), **changes
        )
        for p in paths
    ]


def multipart(*parts: bytes | tuple[str | None, bytes], boundary: str = BOUNDARY) -> bytes:
    """A STOW body; a part is its bytes, or (Content-Type or None for no header, bytes)."""
    items = []
    for part in parts:
        ctype, data = part if isinstance(part, tuple) else ("application/dicom", part)
        headers = {"Content-Type": ctype} if ctype is not None else {}
        items.append((headers, [data]))
    return b"".join(iter_multipart(items, boundary))


def stow(
    client: TestClient, *parts: bytes | tuple[str | None, bytes], path: str = "/dicomweb/studies"
) -> httpx.Response:
    return client.post(path, content=multipart(*parts), headers={"Content-Type": STOW_TYPE})


def stored_files(state: Runtime) -> list[Path]:
    return sorted(p for p in state.store.instances.rglob("*") if p.is_file())


def instance_rows(state: Runtime) -> int:
    with state.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def failures(response: httpx.Response) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = response.json().get(FAILED_SOP_SEQUENCE, {}).get("Value", [])
    return items


def referenced(response: httpx.Response) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = response.json().get(REFERENCED_SOP_SEQUENCE, {}).get("Value", [])
    return items


def value(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0]


def assert_nothing_left(state: Runtime) -> None:
    assert state.store.leftover_staging() == []


def wait_for(condition: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.02)


# -- storing ---------------------------------------------------------------------------------------


def test_stores_every_part_and_answers_with_references(
    client: TestClient, state: Runtime, tiny_study_files: list[Path]
) -> None:
    response = stow(client, *(p.read_bytes() for p in tiny_study_files))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    body = response.json()
    study = str(pydicom.dcmread(tiny_study_files[0]).StudyInstanceUID)
    assert value(body, RETRIEVE_URL) == f"http://testserver/dicomweb/studies/{study}"
    assert FAILED_SOP_SEQUENCE not in body
    items = referenced(response)
    sent = {str(pydicom.dcmread(p).SOPInstanceUID) for p in tiny_study_files}
    assert {value(i, SOP_INSTANCE) for i in items} == sent
    for item in items:
        assert value(item, SOP_CLASS) == "1.2.840.10008.5.1.4.1.1.1.2"
        assert value(item, RETRIEVE_URL).endswith(f"/instances/{value(item, SOP_INSTANCE)}")
        assert f"/studies/{study}/series/" in value(item, RETRIEVE_URL)
    assert len(stored_files(state)) == 4 and instance_rows(state) == 4
    with state.sessions() as session:
        row = session.scalars(select(Instance)).first()
        assert row is not None and row.channel == "stow" and row.source == "testclient"
    assert stored_files(state)[0].read_bytes() in {p.read_bytes() for p in tiny_study_files}
    assert_nothing_left(state)


@SQLITE_ONLY
def test_htj2k_parts_are_stored_as_received(
    client: TestClient, state: Runtime, tiny_study_files: list[Path], tmp_path: Path
) -> None:
    sent = []
    for syntax, cr in (("htj2k", 10), ("htj2k-lossless", 1), ("htj2k-rpcl", 1)):
        out = tmp_path / f"{syntax}.dcm"
        transcode_file(tiny_study_files[0], out, cr=cr, syntax=syntax)
        if syntax != "htj2k":  # a lossless copy keeps its UID: give each its own
            ds = pydicom.dcmread(out)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = new_uid()
            ds.save_as(out, enforce_file_format=True)
        sent.append(out.read_bytes())
    response = stow(client, *sent)
    assert response.status_code == 200, response.text
    assert FAILED_SOP_SEQUENCE not in response.json() and len(referenced(response)) == 3
    assert sorted(p.read_bytes() for p in stored_files(state)) == sorted(sent)


@SQLITE_ONLY
def test_chunked_body_is_parsed_and_written_off_the_event_loop(
    live_url: str,
    admin_key: str,
    state: Runtime,
    monkeypatch: pytest.MonkeyPatch,
    tiny_study_files: list[Path],
) -> None:
    batches: list[int] = []  # chunks per batch handed to the worker thread
    on_loop: list[bool] = []  # per write: was it on the event loop's thread?
    feed, write = stow_routes._Stager.feed, stow_routes._write

    def recording_feed(stager: Any, chunks: list[bytes]) -> None:
        batches.append(len(chunks))
        feed(stager, chunks)

    def recording_write(part: Any, data: bytes) -> None:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # a worker thread has no running loop
            on_loop.append(False)
        write(part, data)

    monkeypatch.setattr(stow_routes._Stager, "feed", recording_feed)
    monkeypatch.setattr(stow_routes, "_write", recording_write)
    body = multipart(*(p.read_bytes() for p in tiny_study_files))
    assert len(body) > 2 * 65536  # more than one socket read of the server

    def chunks() -> Iterator[bytes]:  # chunked transfer encoding: no Content-Length
        for i in range(0, len(body), 4096):
            yield body[i : i + 4096]

    response = httpx.post(
        f"{live_url}/dicomweb/studies",
        content=chunks(),
        headers={"Authorization": f"Bearer {admin_key}", "Content-Type": STOW_TYPE},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert len([b for b in batches if b]) > 1, batches
    assert on_loop and not any(on_loop)
    sent = {p.read_bytes() for p in tiny_study_files}
    assert {f.read_bytes() for f in stored_files(state)} == sent
    assert_nothing_left(state)


def test_store_into_named_study(
    client: TestClient, state: Runtime, tiny_study_files: list[Path]
) -> None:
    study = str(pydicom.dcmread(tiny_study_files[0]).StudyInstanceUID)
    response = stow(client, tiny_study_files[0].read_bytes(), path=f"/dicomweb/studies/{study}")
    assert response.status_code == 200, response.text
    assert value(response.json(), RETRIEVE_URL).endswith(f"/dicomweb/studies/{study}")


def test_part_of_another_study_than_the_path_names_fails(
    client: TestClient, state: Runtime, tiny_study_files: list[Path]
) -> None:
    other = new_uid()
    response = stow(
        client, *(p.read_bytes() for p in tiny_study_files[:2]), path=f"/dicomweb/studies/{other}"
    )
    assert response.status_code == 409, response.text
    items = failures(response)
    assert len(items) == 2
    for item, path in zip(items, tiny_study_files[:2], strict=True):
        assert value(item, FAILURE_REASON) == 0xA900
        assert value(item, SOP_INSTANCE) == str(pydicom.dcmread(path).SOPInstanceUID)
        assert f"not to the study {other}" in value(item, ERROR_COMMENT)
    assert RETRIEVE_URL not in response.json()
    assert stored_files(state) == [] and instance_rows(state) == 0
    assert_nothing_left(state)


def _stored_bytes(state: Runtime, path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    relative = state.store.relative_path(
        *(str(getattr(ds, k)) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    )
    return state.store.absolute(relative).read_bytes()


def test_duplicate_same_bytes_is_success_twice_and_altered_bytes_keep_the_first(
    client: TestClient, state: Runtime, tiny_study_files: list[Path]
) -> None:
    """keep-first (the default): other content under a stored UID is a warning (202 with
    Warning Reason 0xB000 on its Referenced SOP item), and the stored instance stays."""
    original = tiny_study_files[0].read_bytes()
    for _ in range(2):
        response = stow(client, original)
        assert response.status_code == 200, response.text
        assert len(referenced(response)) == 1
    altered = encode(variant(tiny_study_files[0], SeriesDescription="altered copy"))
    response = stow(client, altered, tiny_study_files[1].read_bytes())
    assert response.status_code == 202, response.text
    assert failures(response) == []
    kept, stored = referenced(response)
    assert value(kept, SOP_INSTANCE) == str(pydicom.dcmread(tiny_study_files[0]).SOPInstanceUID)
    assert value(kept, WARNING_REASON) == 0xB000
    assert "stored instance was kept" in value(kept, ERROR_COMMENT)
    assert WARNING_REASON not in stored
    assert instance_rows(state) == 2
    assert _stored_bytes(state, tiny_study_files[0]) == original
    assert_nothing_left(state)


def test_altered_bytes_fail_with_policy_refuse(
    client: TestClient, state: Runtime, tiny_study_files: list[Path]
) -> None:
    state.ingestor.duplicate_policy = DuplicatePolicy.REFUSE  # CRGATE_DUPLICATE_POLICY=refuse
    original = tiny_study_files[0].read_bytes()
    assert stow(client, original).status_code == 200
    altered = encode(variant(tiny_study_files[0], SeriesDescription="altered copy"))
    response = stow(client, altered, tiny_study_files[1].read_bytes())
    assert response.status_code == 202, response.text
    (item,) = failures(response)
    assert value(item, FAILURE_REASON) == 0x0111
    assert "already stored with different content" in value(item, ERROR_COMMENT)
    assert len(referenced(response)) == 1
    assert _stored_bytes(state, tiny_study_files[0]) == original
    assert_nothing_left(state)


def test_stow_after_c_store_in_another_transfer_syntax_is_a_duplicate(
    client: TestClient, state: Runtime, tiny_study_files: list[Path]
) -> None:
    """The instance stored (as by the SCP) in explicit VR, posted again in implicit VR: 200,
    no warning, the stored file untouched."""
    original = tiny_study_files[0].read_bytes()
    assert stow(client, original).status_code == 200
    ds = pydicom.dcmread(tiny_study_files[0])
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    response = stow(client, encode(ds))
    assert response.status_code == 200, response.text
    (item,) = referenced(response)
    assert WARNING_REASON not in item
    assert _stored_bytes(state, tiny_study_files[0]) == original
    assert instance_rows(state) == 1
    assert_nothing_left(state)


# -- bad parts: each fails alone -------------------------------------------------------------------


@SQLITE_ONLY
def test_non_dicom_part_fails_alone(
    client: TestClient, state: Runtime, tiny_study_files: list[Path]
) -> None:
    response = stow(client, tiny_study_files[0].read_bytes(), b"this is not DICOM" * 100)
    assert response.status_code == 202, response.text
    (item,) = failures(response)
    assert value(item, FAILURE_REASON) == 0xC000
    assert "part 2" in value(item, ERROR_COMMENT) and "not a DICOM" in value(item, ERROR_COMMENT)
    assert SOP_INSTANCE not in item
    assert len(referenced(response)) == 1 and len(stored_files(state)) == 1
    parsed = pydicom.Dataset.from_json(response.json())  # what DICOMweb clients do
    assert parsed.FailedSOPSequence[0].FailureReason == 0xC000
    assert len(parsed.ReferencedSOPSequence) == 1
    assert_nothing_left(state)


@SQLITE_ONLY
def test_part_of_another_media_type_fails_alone(
    client: TestClient, state: Runtime, tiny_study_files: list[Path]
) -> None:
    response = stow(
        client,
        ("application/json", b"{}"),
        (None, tiny_study_files[0].read_bytes()),  # no Content-Type: the request's type
    )
    assert response.status_code == 202, response.text
    (item,) = failures(response)
    assert value(item, FAILURE_REASON) == 0xC000
    assert "part 1 is application/json" in value(item, ERROR_COMMENT)
    assert len(referenced(response)) == 1


@SQLITE_ONLY
def test_part_declaring_another_transfer_syntax_fails(
    client: TestClient, state: Runtime, tiny_study_files: list[Path]
) -> None:
    data = tiny_study_files[0].read_bytes()  # Explicit VR Little Endian
    declared = "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.90"
    response = stow(
        client, (declared, data), ("application/dicom; transfer-syntax=1.2.840.10008.1.2.1", data)
    )
    assert response.status_code == 202, response.text
    (item,) = failures(response)
    assert value(item, FAILURE_REASON) == 0xC122
    assert "1.2.840.10008.1.2.4.90" in value(item, ERROR_COMMENT)
    assert len(referenced(response)) == 1
    assert_nothing_left(state)


@SQLITE_ONLY
def test_too_many_parts_is_413(
    client: TestClient,
    state: Runtime,
    monkeypatch: pytest.MonkeyPatch,
    tiny_study_files: list[Path],
) -> None:
    monkeypatch.setattr(stow_routes, "MAX_PARTS", 3)
    response = stow(client, *(p.read_bytes() for p in tiny_study_files))
    assert response.status_code == 413, response.text
    assert "more than 3 parts" in response.json()["detail"]
    assert stored_files(state) == []
    assert_nothing_left(state)


@SQLITE_ONLY
def test_truncated_part_fails(
    client: TestClient, state: Runtime, tiny_study_files: list[Path]
) -> None:
    data = tiny_study_files[0].read_bytes()
    response = stow(client, data[: len(data) // 2])
    assert response.status_code == 409, response.text
    (item,) = failures(response)
    assert value(item, FAILURE_REASON) == 0xC000
    assert "truncated" in value(item, ERROR_COMMENT)
    assert stored_files(state) == [] and instance_rows(state) == 0
    assert_nothing_left(state)


@SQLITE_ONLY
def test_part_without_required_uids_fails(
    client: TestClient, state: Runtime, tiny_study_files: list[Path]
) -> None:
    ds = variant(tiny_study_files[0], SeriesInstanceUID=None)
    response = stow(client, encode(ds))
    assert response.status_code == 409, response.text
    (item,) = failures(response)
    assert value(item, FAILURE_REASON) == 0xA900
    assert "SeriesInstanceUID" in value(item, ERROR_COMMENT)
    assert value(item, SOP_INSTANCE) == str(ds.SOPInstanceUID)
    assert instance_rows(state) == 0


@SQLITE_ONLY
def test_path_traversal_uid_is_refused_and_writes_nothing_outside(
    client: TestClient, state: Runtime, tiny_study_files: list[Path], tmp_path: Path
) -> None:
    evil = "../../../../../../outside"
    ds = variant(tiny_study_files[0], SOPInstanceUID=evil)
    ds2 = variant(tiny_study_files[1], SeriesInstanceUID="1.2/../../x")
    response = stow(client, encode(ds), encode(ds2))
    assert response.status_code == 409, response.text
    items = failures(response)
    assert [value(i, FAILURE_REASON) for i in items] == [0xA900, 0xA900]
    assert "is not a valid DICOM UID" in value(items[0], ERROR_COMMENT)
    assert SOP_INSTANCE not in items[0]  # an invalid UID is not echoed as a UID
    assert stored_files(state) == [] and instance_rows(state) == 0
    assert not Path("/outside.dcm").exists()
    assert not any("outside" in p.name for p in tmp_path.rglob("*"))
    assert_nothing_left(state)


@SQLITE_ONLY
def test_invalid_study_uid_in_path_is_400(client: TestClient, tiny_study_files: list[Path]) -> None:
    response = stow(client, tiny_study_files[0].read_bytes(), path="/dicomweb/studies/1.2.abc")
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "1.2.abc" in response.json()["detail"]


# -- bad requests ----------------------------------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        "application/json",
        f"multipart/form-data; boundary={BOUNDARY}",
        f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
        "",
    ],
)
def test_wrong_content_type_is_415(
    client: TestClient, state: Runtime, tiny_study_files: list[Path], content_type: str
) -> None:
    response = client.post(
        "/dicomweb/studies",
        content=multipart(tiny_study_files[0].read_bytes()),
        headers={"Content-Type": content_type},
    )
    assert response.status_code == 415, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "multipart/related" in response.json()["detail"]
    assert stored_files(state) == []


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("content_type", "body_boundary", "message"),
    [
        ('multipart/related; type="application/dicom"', BOUNDARY, "no boundary"),
        ('multipart/related; type="application/dicom"; boundary="a<b>"', BOUNDARY, "characters"),
        ('multipart/related; type="application/dicom"; boundary="x', BOUNDARY, "unterminated"),
        (STOW_TYPE, "some-other-boundary", "does not contain the boundary"),
        (STOW_TYPE.replace(BOUNDARY, "crgate"), BOUNDARY, "does not match"),
    ],
)
def test_malformed_or_mismatched_boundary_is_400(
    client: TestClient,
    state: Runtime,
    tiny_study_files: list[Path],
    content_type: str,
    body_boundary: str,
    message: str,
) -> None:
    body = multipart(tiny_study_files[0].read_bytes(), boundary=body_boundary)
    response = client.post(
        "/dicomweb/studies", content=body, headers={"Content-Type": content_type}
    )
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"]
    assert stored_files(state) == []
    assert_nothing_left(state)


@SQLITE_ONLY
def test_body_without_closing_boundary_is_400_and_stores_nothing(
    client: TestClient, state: Runtime, tiny_study_files: list[Path]
) -> None:
    body = multipart(*(p.read_bytes() for p in tiny_study_files[:2]))
    body = body[: -len(f"--{BOUNDARY}--\r\n")]
    response = client.post("/dicomweb/studies", content=body, headers={"Content-Type": STOW_TYPE})
    assert response.status_code == 400, response.text
    assert "no closing boundary" in response.json()["detail"]
    assert stored_files(state) == [] and instance_rows(state) == 0
    assert_nothing_left(state)


@SQLITE_ONLY
def test_body_with_no_parts_is_400(client: TestClient) -> None:
    response = client.post(
        "/dicomweb/studies",
        content=f"--{BOUNDARY}--\r\n".encode(),
        headers={"Content-Type": STOW_TYPE},
    )
    assert response.status_code == 400
    assert "no parts" in response.json()["detail"]


@SQLITE_ONLY
def test_oversized_body_by_content_length_is_413(
    client: TestClient, state: Runtime, tiny_study_files: list[Path]
) -> None:
    state.settings.max_upload_bytes = 50_000
    body = multipart(*(p.read_bytes() for p in tiny_study_files))
    assert len(body) > 50_000
    response = client.post("/dicomweb/studies", content=body, headers={"Content-Type": STOW_TYPE})
    assert response.status_code == 413, response.text
    assert "50000 bytes" in response.json()["detail"]
    assert stored_files(state) == []
    assert_nothing_left(state)


@SQLITE_ONLY
def test_oversized_chunked_body_is_413_while_streaming(
    client: TestClient, state: Runtime, tiny_study_files: list[Path]
) -> None:
    state.settings.max_upload_bytes = 50_000
    body = multipart(*(p.read_bytes() for p in tiny_study_files))

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server has to count
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    response = client.post(
        "/dicomweb/studies", content=chunks(), headers={"Content-Type": STOW_TYPE}
    )
    assert response.status_code == 413, response.text
    assert stored_files(state) == [] and instance_rows(state) == 0
    assert_nothing_left(state)


def test_client_disconnecting_mid_body_leaves_nothing_and_server_keeps_serving(
    live_url: str, admin_key: str, state: Runtime, tiny_study_files: list[Path]
) -> None:
    auth = {"Authorization": f"Bearer {admin_key}"}
    body = multipart(*(p.read_bytes() for p in tiny_study_files))
    url = urlsplit(live_url)
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Authorization: Bearer {admin_key}\r\nContent-Type: {STOW_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(head + body[: len(body) // 2])
        wait_for(state.store.leftover_staging, "the server staging the upload")
        # the upload is in progress: other requests are served meanwhile
        assert httpx.get(f"{live_url}/healthz").status_code == 200
        listing = httpx.get(f"{live_url}/dicomweb/studies", headers=auth)
        assert listing.status_code == 200 and listing.json() == []
    wait_for(lambda: not state.store.leftover_staging(), "staged files removed after disconnect")
    assert stored_files(state) == [] and instance_rows(state) == 0
    response = httpx.post(
        f"{live_url}/dicomweb/studies",
        content=body,
        headers={**auth, "Content-Type": STOW_TYPE},
    )
    assert response.status_code == 200, response.text
    assert instance_rows(state) == 4
    assert_nothing_left(state)
