"""Limits a hostile peer cannot get around: the length of one PDU, and how many associations
may be open at once, counted from their request so idle connections cannot use them up.

pynetdicom reads a PDU whole into memory with the length its 6-byte header declares, whatever
Maximum Length we announced (one 600 MB PDU sat in memory). ``cap_pdu(ae, n)`` swaps
``AssociationSocket.recv`` for one that, on the sockets of that AE, refuses to read more than
``max(n, 1 MiB)`` bytes at once (an A-ASSOCIATE-RQ is not bound by Maximum Length): the read
fails like a dropped connection and pynetdicom closes it. Written against pynetdicom 3.0.4
internals; tests/scp/test_connections.py fails if the swap stops taking effect.

pynetdicom counts an association from the moment its TCP connection is accepted, so 32 sockets
that never send an A-ASSOCIATE-RQ blocked every real caller until the ACSE timeout.
``Requested`` counts associations from their request (EVT_REQUESTED) to their connection's
close; the AE's own limit (``maximum_associations``) then only bounds connections (threads).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

log = logging.getLogger("crgate.scp")

MIN_PDU_READ = 1 << 20  # A-ASSOCIATE-RQ/AC PDUs are not bound by Maximum Length
_CAPS: weakref.WeakKeyDictionary[ApplicationEntity, int] = weakref.WeakKeyDictionary()
_ORIGINAL_RECV = AssociationSocket.recv


class PduTooLong(OSError):
    """A PDU declared longer than the AE allows (pynetdicom treats it as a dropped connection)."""


class _NoTraceback(logging.Filter):
    """pynetdicom logs the read error with its traceback; ours is said in one line already."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PduTooLong):
            record.exc_info, record.exc_text = None, None
        return True


_FILTER = _NoTraceback()


def cap_pdu(ae: ApplicationEntity, max_pdu_bytes: int) -> None:
    """Refuse PDUs over ``max_pdu_bytes`` (at least 1 MiB) on ``ae``'s associations."""
    _CAPS[ae] = max(max_pdu_bytes, MIN_PDU_READ)
    AssociationSocket.recv = _capped_recv  # type: ignore[method-assign]
    dul = logging.getLogger("pynetdicom.dul")
    if _FILTER not in dul.filters:
        dul.addFilter(_FILTER)


def _capped_recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    assoc: Any = getattr(self, "assoc", None)
    cap = _CAPS.get(assoc.ae) if assoc is not None else None
    if cap is not None and nr_bytes > cap:
        log.warning(
            "closing the connection from %s: it declared a PDU of %d bytes, over the %d allowed "
            "(CRGATE_MAX_PDU_BYTES)",
            getattr(assoc.requestor, "address", "?"),
            nr_bytes,
            cap,
        )
        raise PduTooLong(f"PDU of {nr_bytes} bytes exceeds the {cap} bytes allowed")
    data: bytearray = _ORIGINAL_RECV(self, nr_bytes)
    return data


class Requested:
    """The associations between their A-ASSOCIATE-RQ and their connection's close."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._open: weakref.WeakSet[Association] = weakref.WeakSet()

    def admit(self, assoc: Association) -> bool:
        """Count ``assoc`` in, unless ``limit`` associations are open already."""
        with self._lock:
            if len(self._open) >= self.limit:
                return False
            self._open.add(assoc)
            return True

    def forget(self, assoc: Association) -> None:
        with self._lock:
            self._open.discard(assoc)
