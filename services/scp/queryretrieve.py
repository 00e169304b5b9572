"""C-FIND and C-GET SCP handlers (Patient Root and Study Root; PS3.4 C.4.1, C.4.3).

Both parse the identifier into the index query QIDO-RS uses (services/core/db/identifier.py),
so a key matches the same way over DIMSE and over HTTP. Callers pass the same association
checks as C-STORE (calling AE and source address allow-lists, at association time).

C-FIND yields one pending response per match as the index is read page by page, and stops with
Cancel (0xFE00) as soon as a C-CANCEL arrived. Pending is 0xFF01 when a return key is not one
crgate indexes (it comes back zero-length).

C-GET sends every matching instance back on the same association as C-STORE sub-operations,
in a transfer syntax the peer accepted for its SOP class (in the SCP role): as stored when
accepted; else (pynetdicom converting between the uncompressed little endian syntaxes)
decoded to Explicit VR Little Endian when the peer took an uncompressed one; else JPEG 2000
lossless when it took that. An instance none fits, or whose file cannot be read, is a failed
sub-operation listed in Failed SOP Instance UID List; the final status is 0x0000, 0xB000 (some
failed) or 0xA702 (all failed), with the counts.

Failure statuses (each with an Error Comment):

=======================================  ======  ========================================
identifier crgate cannot answer          0xA900  Identifier does not match SOP Class (with
(unknown level or key, bad value)                Offending Element)
index database unavailable               0xA700  Out of resources
an unexpected exception                  0xC001  Unable to process (C-FIND), comment
                                                 "internal error: <type name>"
=======================================  ======  ========================================
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from services.core.db.identifier import IdentifierError, Model, find_request, get_query, response
from services.core.db.qido import iter_matches, matching_instances
from services.core.errors import CrgateError, OutputError
from services.core.retrieve.lookup import StoredInstance, read_instance, stored_instance
from services.core.retrieve.transcoding import transcode
from services.core.storage import InstanceStore
from services.scp.handlers import _comment, _status, calling_ae

log = logging.getLogger("crgate.scp")

PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # pending; one or more optional keys were not supported
CANCEL = 0xFE00
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC001

FIND_MODELS = {
    PatientRootQueryRetrieveInformationModelFind: Model.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: Model.STUDY_ROOT,
}
GET_MODELS = {
    PatientRootQueryRetrieveInformationModelGet: Model.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelGet: Model.STUDY_ROOT,
}
_UNCOMPRESSED_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)

Response = tuple[int | Dataset, Dataset | None]


def handle_find(event: Event, sessions: sessionmaker[Session], ae_title: str) -> Iterator[Response]:
    """Stream one pending response per match; Cancel when the peer sent C-CANCEL."""
    model = FIND_MODELS[str(event.request.AffectedSOPClassUID)]
    source = calling_ae(event.assoc)
    sent = 0
    try:
        request = find_request(event.identifier, model)
        pending = PENDING_WARNING if request.unanswered else PENDING
        for match in iter_matches(sessions, request.query):
            if event.is_cancelled:
                log.info("C-FIND from %s cancelled after %d match(es)", source, sent)
                yield CANCEL, None
                return
            yield pending, response(request, match, ae_title=ae_title)
            sent += 1
    except Exception as exc:
        yield _failure("C-FIND", source, exc), None
        return
    log.info("C-FIND (%s, %s) from %s: %d match(es)", model, request.level_name, source, sent)
    yield SUCCESS, None


def handle_get(
    event: Event, sessions: sessionmaker[Session], store: InstanceStore
) -> Iterator[int | Response]:
    """Yield the number of sub-operations, then each instance to send (or Cancel)."""
    model = GET_MODELS[str(event.request.AffectedSOPClassUID)]
    assoc = event.assoc
    source = calling_ae(assoc)
    try:
        query = get_query(event.identifier, model)
        with sessions() as session:
            instances = [stored_instance(store, row) for row in matching_instances(session, query)]
    except Exception as exc:
        # pynetdicom takes a count first: one sub-operation, answered with the failure
        yield 1
        yield _failure("C-GET", source, exc), None
        return
    log.info("C-GET (%s) from %s: %d instance(s) to send", model, source, len(instances))
    yield len(instances)
    for instance in instances:
        if event.is_cancelled:
            log.info("C-GET from %s cancelled", source)
            yield CANCEL, None
            return
        yield PENDING, _for_peer(assoc, instance)


def _for_peer(assoc: Association, instance: StoredInstance) -> Dataset:
    """The instance in a syntax the peer accepted for its SOP class; when none fits or the
    file cannot be read, a dataset without file meta, which pynetdicom counts as a failed
    sub-operation (naming its SOP Instance UID in the Failed SOP Instance UID List)."""
    accepted = [
        UID(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == instance.sop_class_uid and cx.as_scu
    ]
    stored = UID(instance.transfer_syntax_uid)
    target = _target(stored, accepted)
    try:
        if target is None:
            raise CrgateError(
                "the peer accepted no presentation context (SCP role) for "
                f"{UID(instance.sop_class_uid).name or instance.sop_class_uid}"
                + (f" in a syntax crgate can send from {stored.name}" if accepted else "")
            )
        ds = read_instance(instance)
        return ds if target == stored else transcode(ds, target, source=instance.source)
    except Exception as exc:
        log.warning(
            "C-GET to %s: cannot send sop=%s: %s",
            calling_ae(assoc),
            instance.sop_instance_uid,
            exc if isinstance(exc, CrgateError) else type(exc).__name__,
        )
        failed = Dataset()
        failed.SOPClassUID = instance.sop_class_uid
        failed.SOPInstanceUID = instance.sop_instance_uid
        return failed


def _target(stored: UID, accepted: list[UID]) -> UID | None:
    if stored in accepted:
        return stored
    uncompressed = any(ts in _UNCOMPRESSED_LE for ts in accepted)
    if uncompressed:
        # pynetdicom converts between explicit and implicit VR (and deflate) itself
        return stored if stored in _UNCOMPRESSED_LE else UID(ExplicitVRLittleEndian)
    if JPEG2000Lossless in accepted:
        return UID(JPEG2000Lossless)
    return None


def _failure(service: str, source: str, exc: BaseException) -> Dataset:
    code, comment, tags = _failure_status(exc)
    if code == UNABLE_TO_PROCESS:
        log.error("%s from %s failed unexpectedly", service, source, exc_info=exc)
    else:
        log.warning("%s from %s refused with 0x%04X: %s", service, source, code, comment)
    status = _status(code, comment)
    if tags:
        status.OffendingElement = tags
    return status


def _failure_status(exc: BaseException) -> tuple[int, str, list[Any]]:
    if isinstance(exc, IdentifierError):
        return IDENTIFIER_DOES_NOT_MATCH, _comment(str(exc)), list(exc.tags)
    if isinstance(exc, (SQLAlchemyError, OutputError)):
        return OUT_OF_RESOURCES, "index database unavailable; retry", []
    return UNABLE_TO_PROCESS, _comment(f"internal error: {type(exc).__name__}"), []
