"""Instances stored before ingest checked them (or written by another tool into the store):
every retrieve answers 4xx with a reason, never a 500 (issue 16). On SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import JPEG2000
from sqlalchemy.orm import Session

from services.core.db import repository
from services.runtime import Runtime
from tests import hostile

MALFORMED = {
    "unknown-transfer-syntax": lambda: hostile.unknown_transfer_syntax(),
    "missing-columns": lambda: hostile.part10(_without_columns()),
    "unknown-vr-in-bits-allocated": hostile.unknown_vr_in(hostile.BITS_ALLOCATED),
    "unknown-vr-in-columns": hostile.unknown_vr_in(hostile.COLUMNS),
    "native-labelled-jpeg2000": hostile.native_labelled(JPEG2000),
    "native-length-mismatch": hostile.native_length_mismatch,
    "nested-sequences-400": lambda: hostile.nested_sequences(400),
    "nested-sequences-3000": hostile.nested_sequences,
}
OCTET = "multipart/related; type=application/octet-stream"
# what needs the pixels decoded: 4xx with a reason; (path suffix, Accept)
PIXELS = (
    ("", "multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2.4.90"),
    ("/frames/1", OCTET),
    ("/bulkdata/7FE00010", OCTET),
    ("/rendered", "image/png"),
    ("/thumbnail", "image/png"),
)
# what can be answered from the file as stored: 200, or 4xx with a reason
AS_STORED = (
    ("", "multipart/related; type=application/dicom"),
    ("/metadata", "application/dicom+json"),
)


def _without_columns() -> object:
    ds = hostile.image()
    del ds.Columns
    return ds


def _uid(data: bytes, tag: bytes) -> str:
    """The value of the explicit VR UI element ``tag`` (found in the bytes: some of these files
    cannot be parsed at all). An unknown VR in place of UI is read the same way."""
    at = data.index(tag, 132)
    length = int.from_bytes(data[at + 6 : at + 8], "little")
    return data[at + 8 : at + 8 + length].rstrip(b"\x00").decode()


def _plant(state: Runtime, data: bytes) -> str:
    """``data`` placed in the store with an index row, as an older crgate would have left it;
    returns the instance's URL path."""
    template = hostile.image()
    path = state.store.new_staging_path()
    path.write_bytes(data)
    sop, study, series = (
        _uid(data, tag) for tag in (b"\x08\x00\x18\x00", b"\x20\x00\x0d\x00", b"\x20\x00\x0e\x00")
    )
    syntax = _uid(data, b"\x02\x00\x10\x00")
    for keyword, value in (
        ("SOPInstanceUID", sop),
        ("StudyInstanceUID", study),
        ("SeriesInstanceUID", series),
    ):
        setattr(template, keyword, value)
    relative = state.store.relative_path(study, series, sop)
    state.store.place(path, relative)
    session: Session
    with state.sessions() as session, session.begin():
        repository.upsert_instance(
            session,
            row=repository.index_row(template),
            transfer_syntax_uid=syntax,
            path=relative,
            size_bytes=len(data),
            channel="stow",
            source=None,
        )
    return f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_every_retrieve_of_a_malformed_stored_instance_is_4xx(
    client: TestClient, state: Runtime, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = _plant(state, MALFORMED[name]())
    study = url.split("/series/")[0]
    for base in (url, study):
        for resource, accept in PIXELS + AS_STORED:
            if base == study and resource in ("/frames/1", "/bulkdata/7FE00010", "/rendered"):
                continue  # instance-level resources only
            response = client.get(base + resource, headers={"Accept": accept})
            status = response.status_code
            what = (name, base + resource, status, response.text[:300])
            if (resource, accept) in PIXELS:
                assert 400 <= status < 500, what
            else:
                assert status == 200 or 400 <= status < 500, what
            if status >= 400:
                assert response.json()["detail"], what
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert str(state.store.root) not in caplog.text + response.text
