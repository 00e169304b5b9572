"""The one ingest path: every instance (C-STORE, STOW-RS, a worker's outputs) enters here.

validate -> place the staged file (fsync, link into place, fsync dir) -> commit the index row ->
return, and only then does the edge acknowledge. A file is never visible under its final name
before it is complete, and an instance is never acknowledged before its row is committed.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from services.core.config import DuplicatePolicy
from services.core.db import repository
from services.core.db.tables import Instance
from services.core.dicom.compare import same_data_set
from services.core.dicom.uids import loggable_uid, validate_uid
from services.core.dicom.validation import DEFAULT_MAX_INFLATED_BYTES, check_dataset, read_part10
from services.core.errors import (
    Conflict,
    CrgateError,
    InvalidInput,
    NoPixelData,
    NotDicom,
    OutputError,
)
from services.core.storage import InstanceStore
from services.core.telemetry import BYTES_RECEIVED, INGEST_FAILURES, INSTANCES_RECEIVED

log = logging.getLogger(__name__)


class Channel(StrEnum):
    DIMSE = "dimse"
    STOW = "stow"
    WORKER = "worker"
    CLI = "cli"


class Outcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same UID, same data set (any transfer syntax): nothing to do
    REPLACED = "replaced"  # same UID, other content, duplicate policy "replace"
    KEPT = "kept"  # same UID, other content, policy "keep-first": the stored one stays


@dataclass(frozen=True)
class IngestResult:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    outcome: Outcome
    size_bytes: int


@dataclass(frozen=True)
class Header:
    """What ingest needs from a file, read without its pixel data."""

    dataset: Dataset
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    row: repository.IndexRow


class Ingestor:
    """Holds the store and the session factory; one per process, shared by every edge."""

    def __init__(
        self,
        store: InstanceStore,
        sessions: sessionmaker[Session],
        duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST,
        max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
    ) -> None:
        self.store = store
        self.sessions = sessions
        self.duplicate_policy = duplicate_policy
        self.max_inflated_bytes = max_inflated_bytes
        self.observers: list[Callable[[IngestResult, Channel], None]] = []
        self._uid_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def ingest_file(
        self,
        staged: Path,
        *,
        channel: Channel,
        source: str | None = None,
        expected_study_uid: str | None = None,
        expected_sop_class_uid: str | None = None,
    ) -> IngestResult:
        """Ingest a complete Part 10 file staged in the store's ``incoming/`` directory.

        The staged file is consumed: moved into place, or removed when refused.
        ``source`` is the calling AE title or client address (logged, indexed);
        ``expected_sop_class_uid`` the SOP class the sender announced (C-STORE's context).
        """
        try:
            header = read_header(staged, max_inflated_bytes=self.max_inflated_bytes)
            if expected_study_uid is not None and header.study_uid != expected_study_uid:
                raise InvalidInput(
                    f"instance {header.sop_instance_uid} belongs to study {header.study_uid}, "
                    f"not to the study {expected_study_uid} named in the request"
                )
            if expected_sop_class_uid is not None and header.sop_class_uid != str(
                expected_sop_class_uid
            ):
                raise InvalidInput(
                    f"sent as {UID(str(expected_sop_class_uid)).name} but is "
                    f"{UID(header.sop_class_uid).name} (instance {header.sop_instance_uid}; "
                    "the presentation context's SOP class must be the data set's)"
                )
            uid = header.sop_instance_uid
            with self._lock_for(uid), self.store.lock(uid):  # this process's threads, then all
                result = self._store(staged, header, channel=channel, source=source)
        except CrgateError as exc:
            staged.unlink(missing_ok=True)
            INGEST_FAILURES.labels(channel.value, type(exc).__name__).inc()
            log.warning("refused instance via %s: %s", channel.value, exc)
            raise
        except BaseException:
            staged.unlink(missing_ok=True)
            INGEST_FAILURES.labels(channel.value, "InternalError").inc()
            raise
        INSTANCES_RECEIVED.labels(channel.value, result.outcome.value).inc()
        BYTES_RECEIVED.labels(channel.value).inc(result.size_bytes)
        log.info(
            "%s instance sop=%s series=%s study=%s via %s (%d bytes)",
            result.outcome.value,
            result.sop_instance_uid,
            result.series_uid,
            result.study_uid,
            channel.value,
            result.size_bytes,
        )
        for observer in self.observers:  # the instance is stored: an observer cannot undo that
            try:
                observer(result, channel)
            except Exception:
                log.exception("after storing %s: observer failed", result.sop_instance_uid)
        return result

    def ingest_dataset(
        self, ds: Dataset, *, channel: Channel, source: str | None = None
    ) -> IngestResult:
        """Ingest an in-memory dataset (a worker's derived object) through the same path."""
        with self.store.staging() as (path, fh):
            try:
                ds.save_as(fh, enforce_file_format=True)
            except (ValueError, AttributeError, TypeError) as exc:
                raise InvalidInput(f"dataset cannot be written as a Part 10 file: {exc}") from None
        return self.ingest_file(path, channel=channel, source=source)

    # -- internals -----------------------------------------------------------------------------

    def _lock_for(self, uid: str) -> threading.Lock:
        with self._locks_guard:
            if len(self._uid_locks) > 10_000:
                self._uid_locks = {k: v for k, v in self._uid_locks.items() if v.locked()}
            return self._uid_locks.setdefault(uid, threading.Lock())

    def _store(
        self, staged: Path, header: Header, *, channel: Channel, source: str | None
    ) -> IngestResult:
        relative = self.store.relative_path(
            header.study_uid, header.series_uid, header.sop_instance_uid
        )
        size = staged.stat().st_size
        existing = self._row(header.sop_instance_uid)
        if existing is not None:
            return self._duplicate(staged, header, existing, size, channel=channel, source=source)
        indexed = size  # the size of the file the row will describe
        with staged.open("rb") as ours:  # our bytes, whatever happens to the names
            try:
                self.store.place(staged, relative)
            except FileExistsError:
                # a file without a row: a crash between placing and committing, or a writer
                # that does not take the lock; the row (if one appeared meanwhile) decides
                if same_instance(staged, self.store.absolute(relative)):
                    staged.unlink()
                    indexed = self.store.absolute(relative).stat().st_size  # that file stays
                else:
                    existing = self._row(header.sop_instance_uid)
                    if existing is not None:
                        return self._duplicate(
                            staged, header, existing, size, channel=channel, source=source
                        )
                    self.store.replace(staged, relative)
            except OSError as exc:
                raise OutputError(
                    f"cannot store instance {header.sop_instance_uid}: {exc}"
                ) from None
            try:
                self._index_new(header, relative, indexed, channel, source)
            except IntegrityError:
                # a row for this SOP Instance UID was committed meanwhile (by a writer that does
                # not take the lock): a duplicate only if that row's file holds our content
                return self._committed_meanwhile(ours, header, relative, size)
            except BaseException as exc:  # no file stays without its row
                self.store.remove(relative)
                raise _index_error(header, exc) from None
        return self._result(header, Outcome.STORED, size)

    def _index_new(
        self, header: Header, relative: str, size: int, channel: Channel, source: str | None
    ) -> None:
        """Commit a new instance's row. An IntegrityError while no row holds the instance means
        its study or series row went between our insert-if-missing and the instance's insert
        (a deletion of the study committed meanwhile, PostgreSQL): the rows are made again, once.
        """
        try:
            self._index(header, relative, size, channel, source, replace=False)
        except IntegrityError:
            if self._row(header.sop_instance_uid) is not None:
                raise  # a duplicate committed meanwhile: the caller decides
            log.info("sop=%s: its study or series was deleted meanwhile; indexed again",
                     header.sop_instance_uid)  # fmt: skip
            self._index(header, relative, size, channel, source, replace=False)

    def _row(self, sop_instance_uid: str) -> Instance | None:
        try:
            with self.sessions() as session:
                return session.get(Instance, sop_instance_uid)
        except SQLAlchemyError as exc:
            raise OutputError(f"the index database is unavailable: {exc}") from None

    def _committed_meanwhile(
        self, ours: BinaryIO, header: Header, relative: str, size: int
    ) -> IngestResult:
        """After an IntegrityError: DUPLICATE if the committed row's file holds our content."""
        row = self._row(header.sop_instance_uid)
        placed = self.store.absolute(relative)
        if row is None:
            if _same_inode(ours, placed):
                self.store.remove(relative)  # no file stays without its row
            raise OutputError(f"instance {header.sop_instance_uid} not stored: index write failed")
        theirs = self.store.absolute(row.path)
        if row.path != relative and _same_inode(ours, placed):
            self.store.remove(relative)  # ours, placed under a name no row refers to
        try:
            with theirs.open("rb") as fh:
                same = _same_content(ours, fh)
        except FileNotFoundError:
            same = False
        if not same:
            raise Conflict(
                f"SOP Instance UID {header.sop_instance_uid} was stored with different content "
                "by another writer at the same time; this instance was not stored"
            )
        return self._result(header, Outcome.DUPLICATE, size)

    def _duplicate(
        self,
        staged: Path,
        header: Header,
        existing: Instance,
        size: int,
        *,
        channel: Channel,
        source: str | None,
    ) -> IngestResult:
        current = self.store.absolute(existing.path)
        if current.exists() and same_instance(staged, current):
            staged.unlink()
            return self._result(header, Outcome.DUPLICATE, size)
        if self.duplicate_policy is DuplicatePolicy.REFUSE:
            raise Conflict(
                f"SOP Instance UID {header.sop_instance_uid} is already stored with different "
                "content; send it with a new SOP Instance UID (or set CRGATE_DUPLICATE_POLICY="
                "replace to replace stored instances)"
            )
        if self.duplicate_policy is DuplicatePolicy.KEEP_FIRST and current.exists():
            staged.unlink()
            log.warning(
                "sop=%s is already stored with different content; the stored instance is kept "
                "(CRGATE_DUPLICATE_POLICY=keep-first)",
                header.sop_instance_uid,
            )
            return self._result(header, Outcome.KEPT, size)
        relative = self.store.relative_path(
            header.study_uid, header.series_uid, header.sop_instance_uid
        )
        if relative != existing.path or not current.exists():
            raise Conflict(
                f"SOP Instance UID {header.sop_instance_uid} is already stored in another "
                "study or series; it cannot be replaced by an instance that moves it"
            )
        try:
            self.store.replace(staged, relative)
        except OSError as exc:
            raise OutputError(f"cannot replace instance {header.sop_instance_uid}: {exc}") from None
        try:
            self._index(header, relative, size, channel, source, replace=True)
        except BaseException as exc:
            raise _index_error(header, exc) from None
        return self._result(header, Outcome.REPLACED, size)

    def _index(
        self,
        header: Header,
        relative: str,
        size: int,
        channel: Channel,
        source: str | None,
        *,
        replace: bool,
    ) -> None:
        """Commit the instance's index row (with its study and series rows)."""
        with self.sessions() as session, session.begin():
            repository.upsert_instance(
                session,
                row=header.row,
                transfer_syntax_uid=header.transfer_syntax_uid,
                path=relative,
                size_bytes=size,
                channel=channel.value,
                source=source,
                replace=replace,
            )

    @staticmethod
    def _result(header: Header, outcome: Outcome, size: int) -> IngestResult:
        return IngestResult(
            sop_class_uid=header.sop_class_uid,
            sop_instance_uid=header.sop_instance_uid,
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            outcome=outcome,
            size_bytes=size,
        )


def _index_error(header: Header, exc: BaseException) -> BaseException:
    """What an index write failure becomes: a value the database refused is the instance's
    fault (a refusal); anything else of the database is an outage (retry later). The
    statement's parameters (patient data) never reach the message."""
    if isinstance(exc, DataError):
        return InvalidInput(
            f"instance {header.sop_instance_uid} not stored: the index refused one of its values "
            f"({type(exc.orig).__name__})"
        )
    if isinstance(exc, SQLAlchemyError):
        return OutputError(
            f"instance {header.sop_instance_uid} not stored: index write failed "
            f"({type(exc).__name__}; see the database log)"
        )
    return exc


def same_instance(a: Path, b: Path) -> bool:
    """Whether two Part 10 files hold the same instance.

    First the bytes after the file meta group (which each channel writes its own way:
    pynetdicom in the SCP, the sender in STOW-RS; files without a usable group length are
    compared whole); when those differ, the decoded data sets (another transfer syntax:
    services/core/dicom/compare.py).
    """
    with a.open("rb") as fa, b.open("rb") as fb:
        if _same_content(fa, fb):
            return True
    return same_data_set(a, b)


def _same_content(fa: BinaryIO, fb: BinaryIO) -> bool:
    meta_a, meta_b = _file_meta(fa), _file_meta(fb)
    if meta_a is None or meta_b is None:
        start_a = start_b = 0
    elif meta_a[1] != meta_b[1]:
        return False
    else:
        start_a, start_b = meta_a[0], meta_b[0]
    fa.seek(start_a)
    fb.seek(start_b)
    while True:
        chunk_a, chunk_b = fa.read(_COMPARE_CHUNK), fb.read(_COMPARE_CHUNK)
        if chunk_a != chunk_b:
            return False
        if not chunk_a:
            return True


_COMPARE_CHUNK = 1 << 20
_MAX_META = 1 << 16  # a longer file meta group is not believed
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}


def _file_meta(fh: BinaryIO) -> tuple[int, bytes] | None:
    """(offset where the data set starts, transfer syntax UID) from the file meta group.

    The end is the group length (0002,0000) at offset 132; None if there is none, or if the
    group's elements (explicit VR little endian) do not end exactly there.
    """
    fh.seek(128)
    head = fh.read(16)
    if len(head) < 16 or head[:4] != b"DICM" or head[4:10] != b"\x02\x00\x00\x00UL":
        return None
    (length,) = struct.unpack("<H", head[10:12])
    if length != 4:
        return None
    (group_length,) = struct.unpack("<I", head[12:16])
    if group_length > _MAX_META:
        return None
    meta = fh.read(group_length)
    if len(meta) != group_length:
        return None
    position, syntax = 0, None
    while position < group_length:
        if position + 8 > group_length:
            return None
        group, element = struct.unpack("<HH", meta[position : position + 4])
        vr = meta[position + 4 : position + 6]
        if group != 0x0002:
            return None
        if vr in _LONG_VRS:
            if position + 12 > group_length:
                return None
            (size,) = struct.unpack("<I", meta[position + 8 : position + 12])
            value_at = position + 12
        else:
            (size,) = struct.unpack("<H", meta[position + 6 : position + 8])
            value_at = position + 8
        if element == 0x0010:
            syntax = meta[value_at : value_at + size].rstrip(b"\x00 ")
        position = value_at + size
    if position != group_length or syntax is None:
        return None
    return 144 + group_length, syntax


def _same_inode(fh: BinaryIO, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fh.fileno()), path.stat())
    except FileNotFoundError:
        return False


def read_header(path: Path, *, max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> Header:
    """Read and check a Part 10 file's header without loading its pixel data into memory.

    Raises NotDicom (not DICOM, truncated), InvalidUID, InvalidInput (missing attributes,
    file meta disagreeing with the dataset, an unreadable element, Pixel Data that does not
    match Rows x Columns x ...), UnsupportedSyntax (an unknown transfer syntax), TooLarge (a
    deflated body beyond ``max_inflated_bytes``) or NoPixelData (an image SOP class without
    pixels). Messages name UIDs and tags, never other values.
    """
    size = path.stat().st_size
    ds = read_part10(path, max_inflated_bytes=max_inflated_bytes)
    if "TransferSyntaxUID" not in ds.file_meta:
        raise NotDicom("the file has no Transfer Syntax UID in its file meta information")
    _check_complete(path, ds, size)
    check_dataset(ds, _describe(ds))
    missing = [
        k
        for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if not ds.get(k)
    ]
    if missing:
        raise InvalidInput(f"required attribute(s) missing or empty: {', '.join(missing)}")
    sop_uid = validate_uid(str(ds.SOPInstanceUID), "SOP Instance UID")
    sop_class = validate_uid(str(ds.SOPClassUID), "SOP Class UID")
    study = validate_uid(str(ds.StudyInstanceUID), "Study Instance UID")
    series = validate_uid(str(ds.SeriesInstanceUID), "Series Instance UID")
    syntax = validate_uid(str(ds.file_meta.TransferSyntaxUID), "Transfer Syntax UID")
    meta_sop = ds.file_meta.get("MediaStorageSOPInstanceUID")
    if meta_sop and str(meta_sop) != sop_uid:
        raise InvalidInput(
            f"file meta Media Storage SOP Instance UID {loggable_uid(meta_sop)} differs from the "
            "dataset's "
            f"SOP Instance UID {sop_uid}"
        )
    if _is_image_class(sop_class) and not any(
        k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
    ):
        raise NoPixelData(f"instance {sop_uid} is a {UID(sop_class).name} but has no Pixel Data")
    return Header(
        dataset=ds,
        transfer_syntax_uid=syntax,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_uid,
        study_uid=study,
        series_uid=series,
        row=repository.index_row(ds),
    )


def _describe(ds: Dataset) -> str:
    """``instance <SOP Instance UID>`` when that UID is readable and valid, for messages."""
    try:
        return f"instance {validate_uid(str(ds.get('SOPInstanceUID')))}"
    except Exception:  # unreadable (unknown VR) or invalid: not quoted
        return "the instance (its SOP Instance UID is unreadable)"


def _check_complete(path: Path, ds: Dataset, file_size: int) -> None:
    """NotDicom unless the last element pydicom read ends exactly at the end of the file.

    pydicom stops quietly (with a warning) when a file ends inside an element and drops that
    element; the last element it kept then ends before the end of the file.
    """
    if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return  # offsets refer to the inflated stream; zlib reports truncation itself
    last_tell, last = -1, None
    for element in ds._dict.values():
        tell = getattr(element, "value_tell", getattr(element, "file_tell", None))
        if isinstance(tell, int) and tell > last_tell:
            last_tell, last = tell, element
    if last is None:
        raise NotDicom("truncated or damaged DICOM file: no data element could be read")
    length: Any = getattr(last, "length", None)
    value: Any = getattr(last, "value", None)
    end: int | None
    if isinstance(length, int) and length != 0xFFFFFFFF:
        end = last_tell + length
        if isinstance(value, bytes) and len(value) < length:  # cut inside its value
            end = last_tell + len(value) + file_size + 1
    elif getattr(last, "VR", None) == "SQ":
        return  # an undefined-length sequence read to its delimiter; nothing to measure
    else:
        end = _encapsulated_end(path, last_tell)
    if end is not None and end != file_size:
        raise NotDicom(
            f"truncated or damaged DICOM file: its last element ends at byte {end} "
            f"but the file has {file_size} bytes"
        )


def _encapsulated_end(path: Path, tell: int) -> int | None:
    """Where an undefined-length (encapsulated) value starting at ``tell`` ends, or None."""
    with path.open("rb") as fh:
        position = tell
        while True:
            fh.seek(position)
            head = fh.read(8)
            if len(head) < 8:  # the file ends inside an item header: truncated
                return position + 8
            group, element, length = struct.unpack("<HHI", head)
            if (group, element) == (0xFFFE, 0xE0DD):
                return position + 8
            if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
                return None
            position += 8 + length


def _is_image_class(sop_class_uid: str) -> bool:
    name = UID(sop_class_uid).name
    return "Image Storage" in name and "Raw Data" not in name
