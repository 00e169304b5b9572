"""pynetdicom event handlers: C-ECHO, C-STORE into the one ingest path, association logging.

Handlers receive their dependencies as extra arguments (pynetdicom's ``evt_handlers`` tuples).
A C-STORE is answered with success only after ``Ingestor.ingest_file`` returned, i.e. after the
file is fsynced in place and its index row is committed. Refusals carry an Error Comment.

Status for each refusal (PS3.4 B.2.3; the comment says which case it is):

====================================  ======  =============================================
NotDicom (unreadable, truncated)      0xC000  Error: cannot understand
NoPixelData, InvalidUID, InvalidInput 0xA900  Error: data set does not match SOP class
(a value the index refuses, Pixel      (comment: which attribute or which check)
Data unlike its Rows x Columns...,
a SOP class other than the context's)
Conflict (same UID, other content,    0xC010  Error: cannot understand (0xC000-0xCFFF range;
  CRGATE_DUPLICATE_POLICY=refuse)             C-STORE has no "duplicate" failure status)
TooLarge (inflates beyond the limit)  0xA700  Refused: out of resources (comment: the limit)
OutputError (disk, index database)    0xA700  Refused: out of resources (a retry may work)
any other CrgateError                 0xC000  cannot understand
an unexpected exception               0xC001  comment: "internal error: <type name>"
====================================  ======  =============================================

The same data set again (any transfer syntax) is 0x0000. Other content under a stored SOP
Instance UID with the default policy keep-first is 0xB000 (Warning: coercion of data elements;
the stored instance was kept) with an Error Comment saying so.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE

from services.core.dicom.uids import loggable_uid
from services.core.errors import (
    Conflict,
    CrgateError,
    InvalidInput,
    NoPixelData,
    NotDicom,
    OutputError,
    TooLarge,
)
from services.core.ingest import Channel, Ingestor, Outcome
from services.scp.limits import Requested
from services.scp.staging import Transfers

log = logging.getLogger("crgate.scp")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
INTERNAL_ERROR = 0xC001
DUPLICATE_CONFLICT = 0xC010
KEPT_STORED = 0xB000  # Warning: coercion of data elements (the stored instance stands)

_COMMENT_MAX = 64  # Error Comment (0000,0902) is LO


def status_for(exc: BaseException) -> tuple[int, str]:
    """The C-STORE status and a short Error Comment for an ingest failure."""
    if isinstance(exc, NotDicom):
        return CANNOT_UNDERSTAND, "not a complete DICOM data set (unreadable or truncated)"
    if isinstance(exc, Conflict):
        return DUPLICATE_CONFLICT, "SOP Instance UID already stored with other content"
    if isinstance(exc, TooLarge):
        return OUT_OF_RESOURCES, _comment(str(exc))
    if isinstance(exc, OutputError):
        return OUT_OF_RESOURCES, "cannot store now (disk or index unavailable); retry"
    if isinstance(exc, NoPixelData):
        return DOES_NOT_MATCH_SOP_CLASS, "image SOP class instance without Pixel Data"
    if isinstance(exc, InvalidInput):  # InvalidUID, missing or inconsistent attributes
        return DOES_NOT_MATCH_SOP_CLASS, _comment(str(exc))
    if isinstance(exc, CrgateError):
        return CANNOT_UNDERSTAND, _comment(str(exc))
    return INTERNAL_ERROR, _comment(f"internal error: {type(exc).__name__}")


def _comment(text: str) -> str:
    """Fit ``text`` into an LO value: printable, no backslash, at most 64 characters."""
    text = re.sub(r"[^\x20-\x7e]", " ", text).replace("\\", "/")
    text = re.sub(r"\d[\d.]{24,}", lambda m: f"{m.group(0)[:12]}...", text)  # long UIDs
    return text if len(text) <= _COMMENT_MAX else text[: _COMMENT_MAX - 3].rstrip() + "..."


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment
    return ds


def calling_ae(assoc: Association) -> str:
    return str(assoc.requestor.ae_title).strip()


def _primitive(assoc: Association, *, ours: bool = False) -> A_ASSOCIATE:
    """The A-ASSOCIATE request received (or, with ``ours``, the answer sent)."""
    primitive = (assoc.acceptor if ours else assoc.requestor).primitive
    return primitive if primitive is not None else A_ASSOCIATE()


def _peer(assoc: Association) -> str:
    return f"{assoc.requestor.address}:{assoc.requestor.port}"


def handle_echo(event: Event) -> int:
    log.debug("C-ECHO from %s", calling_ae(event.assoc))
    return SUCCESS


def handle_store(event: Event, ingestor: Ingestor, transfers: Transfers) -> Dataset:
    """Ingest the streamed file; success only after ``ingest_file`` returned."""
    assoc = event.assoc
    request: C_STORE = event.request  # type: ignore[assignment]
    sop_uid = loggable_uid(request.AffectedSOPInstanceUID)
    source = calling_ae(assoc)
    try:
        received = Path(event.dataset_path)
        if not transfers.claim(assoc, received):
            received = _stage(received, ingestor)  # written outside incoming/: move it there
        result = ingestor.ingest_file(
            received,
            channel=Channel.DIMSE,
            source=source,
            expected_sop_class_uid=str(event.context.abstract_syntax),
        )
    except Exception as exc:
        code, comment = status_for(exc)
        if code == INTERNAL_ERROR:
            log.exception("C-STORE of sop=%s from %s failed unexpectedly", sop_uid, source)
        else:
            log.warning(
                "C-STORE of sop=%s from %s refused with 0x%04X: %s", sop_uid, source, code, comment
            )
        return _status(code, comment)
    log.debug("C-STORE sop=%s from %s: %s", result.sop_instance_uid, source, result.outcome)
    if result.outcome is Outcome.KEPT:
        return _status(KEPT_STORED, "already stored with other content; stored one kept")
    return _status(SUCCESS)


def _stage(received: Path, ingestor: Ingestor) -> Path:
    """Move (or, across filesystems, copy) a received file into the store's ``incoming/``."""
    if not received.exists():
        raise OutputError("the received data set was removed before it could be stored")
    staged = ingestor.store.new_staging_path()
    try:
        received.replace(staged)
    except OSError:
        try:
            shutil.copyfile(received, staged)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise OutputError(f"cannot stage the received data set: {exc.strerror}") from None
    return staged


# -- association logging and clean-up ------------------------------------------------------------


def handle_accepted(event: Event) -> None:
    assoc = event.assoc
    log.info(
        "association accepted: calling AE %r from %s (called AE %r, %d presentation contexts)",
        calling_ae(assoc),
        _peer(assoc),
        str(_primitive(assoc).called_ae_title).strip(),
        len(assoc.accepted_contexts),
    )


def handle_rejected(event: Event) -> None:
    assoc = event.assoc
    log.warning(
        "association rejected: calling AE %r from %s: %s",
        calling_ae(assoc),
        _peer(assoc),
        _primitive(assoc, ours=True).reason_str,
    )


def handle_requested(event: Event, allowed_hosts: frozenset[str], requested: Requested) -> None:
    """Reject callers whose source address is not allowed, and any association over the limit
    of open associations (counted from their request: idle connections do not count)."""
    assoc = event.assoc
    if allowed_hosts and assoc.requestor.address not in allowed_hosts:
        log.warning(
            "association rejected: calling AE %r from %s: address not in the allowed hosts",
            str(_primitive(assoc).calling_ae_title).strip(),
            _peer(assoc),
        )
        # rejected-permanent, service-user, no reason given
        assoc.acse.send_reject(0x01, 0x01, 0x01)
        assoc.kill()
        return
    if not requested.admit(assoc):
        log.warning(
            "association rejected: calling AE %r from %s: %d associations are open already",
            str(_primitive(assoc).calling_ae_title).strip(),
            _peer(assoc),
            requested.limit,
        )
        # rejected-transient, service-provider (presentation), local-limit-exceeded
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        assoc.kill()


def handle_aborted(event: Event) -> None:
    log.warning(
        "association aborted: calling AE %r from %s", calling_ae(event.assoc), _peer(event.assoc)
    )


def handle_conn_close(event: Event, transfers: Transfers, requested: Requested) -> None:
    """Remove the files of transfers that never completed (A-ABORT, dropped connection)."""
    requested.forget(event.assoc)
    dropped = transfers.drop(event.assoc)
    if dropped:
        log.warning(
            "connection from %s closed during a transfer: removed %d unfinished data set(s)",
            _peer(event.assoc),
            dropped,
        )


def notify_closed(event: Event, callback: Callable[[], None]) -> None:
    """Tell the process an association ended (its instances are stored): best effort."""
    try:
        callback()
    except Exception:  # a nudge is never worth an error on the association
        log.debug("association-closed callback failed", exc_info=True)
