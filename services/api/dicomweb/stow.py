"""STOW-RS (PS3.18 10.5): store instances posted as multipart/related; type="application/dicom".

The body is streamed through an incremental multipart parser into staged files in
``incoming/``, in a worker thread off the event loop (no part is held in memory); once the
closing boundary has arrived, each part goes through the one ingest path in a worker thread.
One bad part fails alone.

Answers: 200 all stored, 202 some failed or kept with a warning (other content under a
stored SOP Instance UID, policy keep-first: Warning Reason 0xB000), 409 none stored (each
with a DICOM JSON store response); 400 unreadable request framing, 413 body over
``max_upload_bytes``, 415 not multipart/related of application/dicom. A client that
disconnects leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pydicom
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from services.api.deps import get_state, require
from services.api.dicomweb.qido import dicomweb_root
from services.api.problems import problem
from services.core.auth import Role
from services.core.dicom.dicomjson import dataset, to_dicom_json
from services.core.dicom.mediatype import DICOM, DICOM_JSON, parse_media_type
from services.core.dicom.multipart import (
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    boundary_of,
)
from services.core.dicom.uids import validate_uid
from services.core.errors import (
    Conflict,
    CrgateError,
    InvalidInput,
    InvalidParameter,
    InvalidUID,
    NotDicom,
    OutputError,
    TooLarge,
    UnsupportedSyntax,
)
from services.core.ingest import Channel, Ingestor, IngestResult, Outcome
from services.core.params import parse_count
from services.core.storage import InstanceStore

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require(Role.OPERATOR))])

MAX_PARTS = 10_000  # per request: each part is a staged file
MAX_PENDING_BYTES = 1024**2  # body received while a batch is written, before the loop waits

# Failure Reason (0008,1197) values, PS3.18 Table 10.5.3-2 / PS3.4 Annex B
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
DUPLICATE_DIFFERENT = 0x0111
SYNTAX_NOT_SUPPORTED = 0xC122
PROCESSING_FAILURE = 0x0110
# Warning Reason (0008,1196): other content under a stored SOP Instance UID, the stored one kept
KEPT_STORED = 0xB000


class _TooLarge(Exception):
    """The body passed max_upload_bytes, or carries more than MAX_PARTS parts."""


class _TooSlow(Exception):
    """Nothing of the body arrived for http_body_timeout seconds."""


@dataclass
class _Part:
    """One body part: a staged file, or a failure found while receiving it."""

    number: int
    declared_syntax: str | None = None
    path: Path | None = None
    handle: IO[bytes] | None = None
    failure: tuple[int, str] | None = None
    handed_over: bool = False  # given to ingest, which consumes the staged file


@dataclass
class _Outcome:
    stored: list[IngestResult] = field(default_factory=list)
    failed: list[Dataset] = field(default_factory=list)  # Failed SOP Sequence items


@router.post("/studies", summary="STOW-RS: store instances")
async def store_instances(request: Request) -> Response:
    return await _store(request, None)


@router.post("/studies/{study}", summary="STOW-RS: store instances of one study")
async def store_study_instances(study: str, request: Request) -> Response:
    try:
        validate_uid(study, "Study Instance UID in the path")
    except InvalidUID as exc:
        return problem(400, "Bad Request", str(exc))
    return await _store(request, study)


async def _store(request: Request, study: str | None) -> Response:
    state = get_state(request)
    limit = state.settings.max_upload_bytes
    boundary_or_error = _check_headers(request, limit)
    if isinstance(boundary_or_error, Response):
        return boundary_or_error
    parts: list[_Part] = []
    try:
        try:
            await _receive(
                request,
                boundary_or_error,
                state.store,
                parts,
                limit,
                state.settings.http_body_timeout,
            )
        except _TooSlow as exc:
            log.info("STOW-RS body stalled; %d part(s) discarded", len(parts))
            return problem(408, "Request Timeout", str(exc))
        except ClientDisconnect:
            log.info("STOW-RS client disconnected mid-body; %d part(s) discarded", len(parts))
            return Response(status_code=400)  # nobody reads it
        except _TooLarge as exc:
            return problem(413, "Content Too Large", f"{exc}; send fewer instances per request")
        except InvalidInput as exc:  # the framing cannot be read: nothing is stored
            return problem(400, "Bad Request", f"unreadable multipart body: {exc}")
        if not parts:
            return problem(400, "Bad Request", "the multipart body contains no parts")
        host = request.client.host if request.client else None
        outcome = _Outcome()
        for part in parts:
            await _ingest(state.ingestor, part, study, host, outcome)
    finally:
        _discard(parts)
    if outcome.stored:  # a complete study starts now, not at the next housekeeping period
        await run_in_threadpool(state.queue.nudge)
    return _response(request, study, outcome)


def _check_headers(request: Request, limit: int) -> str | Response:
    """The boundary, or the error response for a wrong Content-Type or Content-Length."""
    raw = request.headers.get("content-type", "")
    try:
        media, params = parse_media_type(raw)
    except InvalidInput as exc:
        return problem(400, "Bad Request", f"unreadable Content-Type {raw!r}: {exc}")
    part_type = params.get("type", DICOM).lower()
    if media != "multipart/related" or part_type != DICOM:
        return problem(
            415,
            "Unsupported Media Type",
            f'STOW-RS here takes multipart/related; type="{DICOM}"; boundary=...; got {raw!r}',
        )
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = parse_count(length.strip(), "Content-Length")
        except InvalidParameter as exc:
            return problem(400, "Bad Request", str(exc))
        if declared > limit:
            return problem(
                413,
                "Content Too Large",
                f"the request body ({length} bytes) exceeds the limit of {limit} bytes "
                "(CRGATE_MAX_UPLOAD_BYTES); send fewer instances per request",
            )
    try:
        return boundary_of(params)
    except InvalidInput as exc:
        return problem(400, "Bad Request", str(exc))


async def _receive(
    request: Request,
    boundary: str,
    store: InstanceStore,
    parts: list[_Part],
    limit: int,
    timeout: float,
) -> None:
    """Stream the body into staged files, one per part; raises InvalidInput on bad framing.

    The event loop only receives and counts; parsing and writing run in a worker thread, one
    batch of chunks at a time. Chunks that arrive while a batch is being written form the next
    batch (at most MAX_PENDING_BYTES before the loop waits), so memory stays bounded. A body
    that sends nothing for ``timeout`` seconds raises _TooSlow (its staged files are removed).
    """
    stager = _Stager(boundary, store, parts)
    received = pending = 0
    batch: list[bytes] = []
    writing: asyncio.Task[None] | None = None
    chunks = request.stream().__aiter__()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(anext(chunks), timeout)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise _TooSlow(
                    f"nothing of the request body arrived for {timeout:g} s "
                    "(CRGATE_HTTP_BODY_TIMEOUT); send the body without pauses"
                ) from None
            received += len(chunk)
            if received > limit:
                raise _TooLarge(
                    f"the request body exceeds the limit of {limit} bytes (CRGATE_MAX_UPLOAD_BYTES)"
                )
            batch.append(chunk)
            pending += len(chunk)
            if writing is not None and (writing.done() or pending >= MAX_PENDING_BYTES):
                done, writing = writing, None
                await done  # raises the batch's error
            if writing is None:
                writing = asyncio.create_task(run_in_threadpool(stager.feed, batch))
                batch, pending = [], 0
        if writing is not None:
            done, writing = writing, None
            await done
        await run_in_threadpool(stager.finish, batch)
    except BaseException as exc:
        if writing is not None:
            await asyncio.wait({writing})  # its thread must not stage a file after _discard
            error = None if writing.cancelled() else writing.exception()
            if error is not None and isinstance(exc, ClientDisconnect | _TooLarge | _TooSlow):
                raise error from None  # earlier in the body: it wins, as in a serial parse
        raise


class _Stager:
    """The multipart parser and the part being staged (used by one thread at a time)."""

    def __init__(self, boundary: str, store: InstanceStore, parts: list[_Part]) -> None:
        self.parser = MultipartParser(boundary)
        self.store = store
        self.parts = parts
        self.current: _Part | None = None

    def feed(self, chunks: list[bytes]) -> None:
        """Parse ``chunks`` and write their parts' data to staged files."""
        for chunk in chunks:
            for event in self.parser.feed(chunk):
                if isinstance(event, PartStart):
                    if len(self.parts) >= MAX_PARTS:
                        raise _TooLarge(f"the request has more than {MAX_PARTS} parts")
                    self.current = _open_part(len(self.parts) + 1, event, self.store)
                    self.parts.append(self.current)
                elif isinstance(event, PartData) and self.current is not None:
                    _write(self.current, event.data)
                elif isinstance(event, PartEnd) and self.current is not None:
                    _close(self.current)
                    self.current = None

    def finish(self, chunks: list[bytes]) -> None:
        """Feed the last chunks; raises InvalidInput when the closing boundary is missing."""
        self.feed(chunks)
        self.parser.close()


def _open_part(number: int, start: PartStart, store: InstanceStore) -> _Part:
    part = _Part(number=number)
    raw = start.content_type or DICOM  # the request's type parameter applies
    try:
        media, params = parse_media_type(raw)
    except InvalidInput as exc:
        part.failure = (CANNOT_UNDERSTAND, f"part {number}: unreadable Content-Type ({exc})")
        return part
    if media != DICOM:
        part.failure = (
            CANNOT_UNDERSTAND,
            f"part {number} is {media}, not {DICOM}; only DICOM Part 10 files can be stored",
        )
        return part
    part.declared_syntax = params.get("transfer-syntax")
    try:
        part.path = store.new_staging_path()
        part.handle = part.path.open("wb")
    except OSError as exc:
        _fail_io(part, exc)
    return part


def _write(part: _Part, data: bytes) -> None:
    if part.handle is None:
        return  # a failed part: its data is dropped
    try:
        part.handle.write(data)
    except OSError as exc:
        _fail_io(part, exc)


def _close(part: _Part) -> None:
    if part.handle is not None:
        try:
            part.handle.close()
        except OSError as exc:
            _fail_io(part, exc)
        part.handle = None


def _fail_io(part: _Part, exc: OSError) -> None:
    log.error("STOW-RS part %d could not be staged: %s", part.number, exc.strerror or exc)
    part.failure = (OUT_OF_RESOURCES, f"part {part.number} could not be staged: {exc.strerror}")
    if part.handle is not None:
        part.handle.close()
        part.handle = None
    if part.path is not None:
        part.path.unlink(missing_ok=True)
        part.path = None


def _discard(parts: list[_Part]) -> None:
    """Remove every staged file ingest has not taken over."""
    for part in parts:
        if part.handle is not None:
            part.handle.close()
            part.handle = None
        if part.path is not None and not part.handed_over:
            part.path.unlink(missing_ok=True)


async def _ingest(
    ingestor: Ingestor, part: _Part, study: str | None, host: str | None, outcome: _Outcome
) -> None:
    if part.failure is not None or part.path is None:
        code, reason = part.failure or (PROCESSING_FAILURE, f"part {part.number} was not staged")
        outcome.failed.append(_failed_item(None, None, code, reason))
        return
    path = part.path
    sop_class, sop_uid, syntax = await run_in_threadpool(_peek, path)
    if part.declared_syntax and syntax and part.declared_syntax != syntax:
        outcome.failed.append(
            _failed_item(
                sop_class,
                sop_uid,
                SYNTAX_NOT_SUPPORTED,
                f"part {part.number} declares transfer-syntax={part.declared_syntax} but "
                f"the file is encoded in {syntax}",
            )
        )
        return
    part.handed_over = True
    try:
        result = await run_in_threadpool(
            ingestor.ingest_file,
            path,
            channel=Channel.STOW,
            source=host,
            expected_study_uid=study,
        )
    except CrgateError as exc:
        outcome.failed.append(
            _failed_item(sop_class, sop_uid, _failure_reason(exc), f"part {part.number}: {exc}")
        )
        return
    except Exception as exc:
        log.exception("STOW-RS part %d: unexpected %s", part.number, type(exc).__name__)
        outcome.failed.append(
            _failed_item(
                sop_class,
                sop_uid,
                PROCESSING_FAILURE,
                f"part {part.number}: internal error ({type(exc).__name__}); see the server log",
            )
        )
        return
    outcome.stored.append(result)


def _peek(path: Path) -> tuple[str | None, str | None, str | None]:
    """SOP Class UID, SOP Instance UID and transfer syntax from the file meta when readable and
    valid, else None. The data set is not parsed: a deflated one would be inflated whole in
    memory (a 120 KB part inflating to 120 MB cost 250 MB here), a deep one recursed into;
    ingest reads it with its limits and checks it agrees with the meta."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:
        return None, None, None
    found: list[str | None] = []
    for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID"):
        try:
            value = meta.get(keyword)  # an unknown VR raises here
            found.append(validate_uid(str(value)) if value else None)
        except Exception:  # unreadable or invalid: ingest says why
            found.append(None)
    return found[0], found[1], found[2]


# the Failure Reason of a refused instance, by error type; the first match counts
_FAILURE_REASONS: tuple[tuple[type[CrgateError], int], ...] = (
    (NotDicom, CANNOT_UNDERSTAND),
    (Conflict, DUPLICATE_DIFFERENT),
    (UnsupportedSyntax, SYNTAX_NOT_SUPPORTED),
    (TooLarge, OUT_OF_RESOURCES),
    (InvalidInput, DOES_NOT_MATCH),
    (OutputError, OUT_OF_RESOURCES),
)


def _failure_reason(exc: CrgateError) -> int:
    return next((code for t, code in _FAILURE_REASONS if isinstance(exc, t)), PROCESSING_FAILURE)


def _failed_item(sop_class: str | None, sop_uid: str | None, code: int, reason: str) -> Dataset:
    item: dict[str, list[Any]] = {"ErrorComment": [reason], "FailureReason": [code]}
    if sop_class:
        item["ReferencedSOPClassUID"] = [sop_class]
    if sop_uid:
        item["ReferencedSOPInstanceUID"] = [sop_uid]
    return dataset(item)


def _referenced_item(root: str, result: IngestResult) -> Dataset:
    item: dict[str, list[Any]] = {
        "ReferencedSOPClassUID": [result.sop_class_uid],
        "ReferencedSOPInstanceUID": [result.sop_instance_uid],
        "RetrieveURL": [
            f"{root}/studies/{result.study_uid}/series/{result.series_uid}"
            f"/instances/{result.sop_instance_uid}"
        ],
    }
    if result.outcome is Outcome.KEPT:
        item["WarningReason"] = [KEPT_STORED]
        item["ErrorComment"] = [
            "already stored with other content; the stored instance was kept "
            "(CRGATE_DUPLICATE_POLICY=keep-first)"
        ]
    return dataset(item)


def _response(request: Request, study: str | None, outcome: _Outcome) -> JSONResponse:
    root = dicomweb_root(request)
    body: dict[str, list[Any]] = {}
    studies = {r.study_uid for r in outcome.stored}
    target = study or (studies.pop() if len(studies) == 1 else None)
    if target is not None and outcome.stored:
        body["RetrieveURL"] = [f"{root}/studies/{target}"]
    if outcome.failed:
        body["FailedSOPSequence"] = outcome.failed
    if outcome.stored:
        body["ReferencedSOPSequence"] = [_referenced_item(root, r) for r in outcome.stored]
    warned = any(r.outcome is Outcome.KEPT for r in outcome.stored)
    status = 200 if not (outcome.failed or warned) else (202 if outcome.stored else 409)
    log.info(
        "STOW-RS: %d stored, %d failed (HTTP %d)", len(outcome.stored), len(outcome.failed), status
    )
    return JSONResponse(to_dicom_json(dataset(body)), status_code=status, media_type=DICOM_JSON)
