"""A study deleted while one of its instances is being stored, on SQLite and PostgreSQL, with
real sessions in two threads and the real ingest and deletion code paused at one point each.

Whichever commits first, the instance its sender was told is stored is either in the index
with its file, or deleted with the study and counted in the deletion's report; no file stays
without its row, no row without its file. Found on PostgreSQL: an instance committed after the
deletion listed the study's instances went with the study's cascade, its file left behind
(its sender had been told it was stored), and one inserted while the deletion held the study
got 0xA700 with its file left behind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services.core import deletion, ingest
from services.core.db import repository
from services.core.db.tables import Instance, Study
from services.core.dicom.uids import new_uid
from services.core.ingest import Channel, Ingestor, Outcome
from services.core.storage import InstanceStore

BLOCKED_SECONDS = 1.5  # how long the other side is given to run into the lock
JOIN_SECONDS = 60


def store_all(ingestor: Ingestor, files: list[Path]) -> None:
    for path in files:
        staged = ingestor.store.new_staging_path()
        staged.write_bytes(path.read_bytes())
        ingestor.ingest_file(staged, channel=Channel.STOW)


def one_more_of(path: Path, ingestor: Ingestor) -> tuple[Path, str]:
    """A staged new instance of the same study and series."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    staged = ingestor.store.new_staging_path()
    ds.save_as(staged, enforce_file_format=True)
    return staged, str(ds.SOPInstanceUID)


class Gate:
    """Pause a wrapped function after it ran until the test opens the gate."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()

    def after(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def paused(*args: Any, **kwargs: Any) -> Any:
            out = function(*args, **kwargs)
            self.reached.set()
            assert self.go.wait(JOIN_SECONDS), "the test never opened the gate"
            return out

        return paused


def in_thread(function: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = function()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def race(gate: Gate, first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
    """Run ``first`` until it passes the gate, start ``second``, give it time to run into the
    first's lock, open the gate; both must finish without an error."""
    one, first_box = in_thread(first)
    assert gate.reached.wait(JOIN_SECONDS)
    two, second_box = in_thread(second)
    time.sleep(BLOCKED_SECONDS)
    gate.go.set()
    one.join(JOIN_SECONDS)
    two.join(JOIN_SECONDS)
    assert "error" not in first_box and "error" not in second_box, (first_box, second_box)
    return first_box["value"], second_box["value"]


def consistent(sessions: sessionmaker[Session], store: InstanceStore) -> set[str]:
    """Every row has its file and every stored file its row; the SOP UIDs indexed."""
    with sessions() as session:
        rows = {r.sop_instance_uid: r.path for r in session.scalars(select(Instance))}
    files = {str(p.relative_to(store.root)) for p in store.instances.rglob("*.dcm")}
    assert set(rows.values()) == files, (sorted(files - set(rows.values())), rows)
    return set(rows)


@pytest.fixture
def study(ingestor: Ingestor, tiny_study_files: list[Path]) -> Iterator[str]:
    store_all(ingestor, tiny_study_files[:3])
    yield str(pydicom.dcmread(tiny_study_files[0], stop_before_pixels=True).StudyInstanceUID)


def test_an_instance_inserted_before_the_deletion_is_deleted_with_it(
    ingestor: Ingestor,
    sessions: sessionmaker[Session],
    store: InstanceStore,
    tiny_study_files: list[Path],
    study: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = Gate()
    monkeypatch.setattr(
        ingest.repository, "upsert_instance", gate.after(repository.upsert_instance)
    )
    staged, sop = one_more_of(tiny_study_files[3], ingestor)
    result, report = race(  # the ingest inserted, not committed; then the deletion
        gate,
        lambda: ingestor.ingest_file(staged, channel=Channel.STOW),
        lambda: deletion.delete_study(sessions, store, study, actor="test"),
    )
    assert result.outcome is Outcome.STORED  # what the sender was told
    indexed = consistent(sessions, store)
    if database_url.startswith("postgresql"):
        # the deletion waited for the ingest's commit and took its instance too
        assert indexed == set() and report.instances == 4 and report.files_removed == 4
    else:
        # SQLite's one writer: the deletion's listing came first, the new instance stays
        assert indexed == {sop} and report.instances == 3


def test_an_instance_inserted_while_the_deletion_holds_the_study_is_stored_after_it(
    ingestor: Ingestor,
    sessions: sessionmaker[Session],
    store: InstanceStore,
    tiny_study_files: list[Path],
    study: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = Gate()
    monkeypatch.setattr(deletion, "_hold", gate.after(deletion._hold))
    staged, sop = one_more_of(tiny_study_files[3], ingestor)
    report, result = race(  # the deletion holds the study's row; then the ingest
        gate,
        lambda: deletion.delete_study(sessions, store, study, actor="test"),
        lambda: ingestor.ingest_file(staged, channel=Channel.STOW),
    )
    assert result.outcome is Outcome.STORED
    indexed = consistent(sessions, store)
    if database_url.startswith("postgresql"):
        # the ingest waited for the deletion, then made the study again: the instance is kept
        assert indexed == {sop} and report.instances == 3
        with sessions() as session:
            assert session.get(Study, study) is not None
    else:
        # SQLite: the ingest committed before the deletion's listing, which then took it
        assert indexed == set() and report.instances == 4
