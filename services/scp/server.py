"""The DICOM SCP: C-ECHO, C-STORE of every storage SOP class into the one ingest path, and
C-FIND, C-GET and C-MOVE (Patient Root and Study Root, services/scp/queryretrieve.py).

``start_server(settings, ingestor)`` listens (non-blocking) and returns an ``ScpServer``;
``shutdown()`` stops accepting, lets running associations finish for a while, then aborts them.
Data sets are accepted in the transfer syntax they arrive in and streamed to disk as they arrive
(see services/scp/staging.py); nothing is decoded on receipt.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from services.core.config import Settings
from services.core.ingest import Ingestor
from services.scp import handlers, limits, queryretrieve, staging

log = logging.getLogger("crgate.scp")

#: accepted as received, uncompressed first (offered to callers in this order of preference)
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]
MAX_ASSOCIATIONS = 32  # open at once, counted from their request (services/scp/limits.py)
MAX_CONNECTIONS = 128  # TCP connections, each a thread, idle ones included
DRAIN_SECONDS = 10.0


class QuickCopyContexts(list[PresentationContext]):
    """The server's supported contexts, copied for each association in about 1 ms.

    pynetdicom deep-copies them for every association it accepts (negotiation writes into
    them); with ~170 contexts of 16 transfer syntaxes that took ~30 ms of CPU per association.
    Copying each context and its transfer syntax list is enough: the UIDs are immutable.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            clone = copy.copy(context)
            clone._transfer_syntax = list(context._transfer_syntax)
            copies.append(clone)
        return copies


class ScpServer:
    """A running SCP: its port, and ``shutdown()``."""

    def __init__(
        self, ae: AE, server: ThreadedAssociationServer, transfers: staging.Transfers
    ) -> None:
        self.ae = ae
        self._server = server
        self._transfers = transfers

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    def shutdown(self, drain_seconds: float = DRAIN_SECONDS) -> None:
        """Stop listening; wait up to ``drain_seconds`` for running associations, abort the rest."""
        self._server.shutdown()
        deadline = time.monotonic() + drain_seconds
        while self._server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._server.active_associations:
            log.warning("aborting association with %r at shutdown", handlers.calling_ae(assoc))
            assoc.abort()
        self._transfers.drop_all()
        staging.unregister(self.ae)
        log.info("DICOM SCP stopped")


def create_ae(settings: Settings) -> AE:
    """Our AE: Verification, every storage SOP class (either role: a C-GET peer takes the SCP
    role), C-FIND and C-GET, a bounded PDU size (one PDU is held in memory whole), short ACSE
    and network timeouts, optional AE allow-list."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu_bytes
    ae.acse_timeout = settings.dicom_acse_timeout
    ae.network_timeout = settings.dicom_network_timeout
    ae.dimse_timeout = settings.dicom_network_timeout
    ae.maximum_associations = MAX_CONNECTIONS
    limits.cap_pdu(ae, settings.max_pdu_bytes)
    uncompressed = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    ae.add_supported_context(Verification, uncompressed)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(
            context.abstract_syntax, TRANSFER_SYNTAXES, scu_role=True, scp_role=True
        )
    for sop_class in (
        *queryretrieve.FIND_MODELS,
        *queryretrieve.GET_MODELS,
        *queryretrieve.MOVE_MODELS,
    ):
        ae.add_supported_context(sop_class, uncompressed)
    # pynetdicom would log C-FIND/C-GET identifiers (patient names, IDs) at INFO
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    # pynetdicom rejects others: rejected-permanent, service-user, "calling AE not recognised"
    ae.require_calling_aet = sorted(settings.allowed_ae_titles)
    return ae


def start_server(
    settings: Settings,
    ingestor: Ingestor,
    *,
    host: str = "0.0.0.0",
    on_closed: Callable[[], None] | None = None,
) -> ScpServer:
    """Listen on ``host``:``settings.dicom_port`` (non-blocking); OSError if the port is taken.

    ``on_closed`` is called after each association's connection closes (what arrived in it is
    stored by then): the runtime nudges housekeeping with it.
    """
    ae = create_ae(settings)
    transfers = staging.register(ae, ingestor.store.incoming)
    requested = limits.Requested(MAX_ASSOCIATIONS)
    handlers_: list[Any] = [
        (evt.EVT_C_ECHO, handlers.handle_echo),
        (evt.EVT_C_STORE, handlers.handle_store, [ingestor, transfers]),
        (evt.EVT_C_FIND, queryretrieve.handle_find, [ingestor.sessions, settings.ae_title]),
        (evt.EVT_C_GET, queryretrieve.handle_get, [ingestor.sessions, ingestor.store]),
        (evt.EVT_C_MOVE, queryretrieve.handle_move, [ingestor.sessions, ingestor.store]),
        (evt.EVT_REQUESTED, handlers.handle_requested, [settings.allowed_host_set, requested]),
        (evt.EVT_ACCEPTED, handlers.handle_accepted),
        (evt.EVT_REJECTED, handlers.handle_rejected),
        (evt.EVT_ABORTED, handlers.handle_aborted),
        (evt.EVT_CONN_CLOSE, handlers.handle_conn_close, [transfers, requested]),
    ]
    if on_closed is not None:
        handlers_.append((evt.EVT_CONN_CLOSE, handlers.notify_closed, [on_closed]))
    try:
        server = ae.start_server((host, settings.dicom_port), block=False, evt_handlers=handlers_)
    except OSError:
        staging.unregister(ae)
        raise
    assert server is not None  # non-blocking start returns the server
    server.contexts = QuickCopyContexts(server.contexts)
    if settings.allowed_ae_titles:
        log.info("DICOM SCP accepts calling AE titles: %s", ", ".join(ae.require_calling_aet))
    else:
        log.warning(
            "DICOM SCP accepts ANY calling AE title (set CRGATE_ALLOWED_AE to restrict callers)"
        )
    if settings.allowed_host_set:
        log.info("DICOM SCP accepts source addresses: %s", ", ".join(settings.allowed_host_set))
    scp = ScpServer(ae, server, transfers)
    log.info("DICOM SCP %r listening on %s:%d", settings.ae_title, host, scp.port)
    return scp
