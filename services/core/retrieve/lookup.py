"""Finding stored instances in the index, and reading their files."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from services.core.db import repository
from services.core.db.tables import Instance
from services.core.dicom.io import read_dataset
from services.core.dicom.uids import validate_uid
from services.core.dicom.validation import check_dataset
from services.core.errors import CrgateError, NotDicom, NotFound
from services.core.retrieve.errors import StoredMalformed
from services.core.storage import InstanceStore

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class StoredInstance:
    """What the index says about one stored instance, with its file's absolute path."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    frames: int
    is_image: bool
    sop_class_uid: str = ""

    @property
    def source(self) -> str:
        return f"instance {self.sop_instance_uid}"


def find_instances(
    sessions: sessionmaker[Session],
    store: InstanceStore,
    *,
    study: str,
    series: str | None = None,
    sop: str | None = None,
) -> list[StoredInstance]:
    """The stored instances of a study, series or one instance; NotFound when there are none.

    Every file is checked to exist: a missing one is logged as an error and raises NotFound.
    """
    validate_uid(study, "Study Instance UID")
    if series is not None:
        validate_uid(series, "Series Instance UID")
    if sop is not None:
        validate_uid(sop, "SOP Instance UID")
    with sessions() as session:
        if sop is not None:
            row = repository.get_instance(session, sop_instance_uid=sop)
            rows = [row] if row and row.study_uid == study and row.series_uid == series else []
        else:
            rows = repository.instances_in(session, study_uid=study, series_uid=series)
    if not rows:
        if sop is not None:
            raise NotFound(f"instance {sop} of series {series} in study {study} is not stored here")
        if series is not None:
            raise NotFound(f"series {series} of study {study} is not stored here")
        raise NotFound(f"study {study} is not stored here")
    found = [stored_instance(store, row) for row in rows]
    for instance in found:
        check_file(instance)
    return found


def stored_instance(store: InstanceStore, row: Instance) -> StoredInstance:
    """What an index row says, with the file's absolute path (not checked here)."""
    return StoredInstance(
        study_uid=row.study_uid,
        series_uid=row.series_uid,
        sop_instance_uid=row.sop_instance_uid,
        transfer_syntax_uid=row.transfer_syntax_uid,
        path=store.absolute(row.path),
        frames=row.number_of_frames or 1,
        is_image=row.rows is not None,
        sop_class_uid=row.sop_class_uid,
    )


def check_file(instance: StoredInstance) -> None:
    """NotFound (logged as an error) when the file of an indexed instance is not in the store."""
    if not instance.path.is_file():
        log.error(
            "file of instance sop=%s series=%s study=%s is missing: %s",
            instance.sop_instance_uid,
            instance.series_uid,
            instance.study_uid,
            instance.path,
        )
        raise NotFound(
            f"instance {instance.sop_instance_uid} is indexed but its file is missing from "
            "the store; the operator has been told (see the server log)"
        )


def read_instance(instance: StoredInstance) -> Dataset:
    """The whole dataset; NotFound (logged) when the file vanished since it was looked up,
    StoredMalformed when it cannot be served (see ``servable``)."""
    check_file(instance)
    try:
        ds = read_dataset(instance.path)
    except NotDicom as exc:
        reason = str(exc).removeprefix(f"{instance.path}: ")  # no server path in an answer
        raise StoredMalformed(f"{instance.source} is stored but unreadable: {reason}") from None
    return servable(ds, instance)


def servable(ds: Dataset, instance: StoredInstance) -> Dataset:
    """``ds`` when it passes the checks ingest makes today; StoredMalformed (HTTP 422) saying
    why not (a file stored before ingest checked it, or changed in the store since)."""
    try:
        check_dataset(ds, instance.source)
    except CrgateError as exc:
        raise StoredMalformed(f"the stored file cannot be served: {exc}") from None
    return ds


def iter_file(path: Path, chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
    """A stored file in chunks, so a study is never held in memory whole."""
    with path.open("rb") as fh:
        while data := fh.read(chunk):
            yield data
