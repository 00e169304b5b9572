"""Forward a job's DICOM outputs to a configured PACS by C-STORE (pynetdicom as SCU).

The sender of ``services.core.forwards`` (which keeps each object's state, retries and
re-sends): one association per batch, each object's outcome (sent, with the syntax that went
out; to retry; failed, with the peer's status and Error Comment). A peer that accepts no
JPEG 2000 gets the copies decoded. Targets are registry destinations, or ``AET@host:port``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt

from services.core.errors import InvalidParameter
from services.core.forwards import Delivery, Outcome, Peer, Sender, is_retryable

log = logging.getLogger(__name__)

_TARGET = re.compile(r"^(?P<aet>[^@\\]{1,16})@(?P<host>[^:]+):(?P<port>[0-9]{1,5})$")


@dataclass(frozen=True)
class ForwardTarget:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ForwardTarget:
        match = _TARGET.match(text.strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise InvalidParameter(
                f"forward target {text!r} is not AET@host:port (e.g. PACS@10.0.0.5:104)"
            )
        return cls(match["aet"].strip(), match["host"], int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class DicomForwarder:
    """C-STORE of a set of files to one peer on one association.

    Each SOP class is proposed in each file's own transfer syntax and, in a context of its own,
    uncompressed. An object whose syntax the peer did not accept is sent decoded (explicit VR
    little endian when accepted, else implicit); a lossy copy keeps Lossy Image Compression
    "01", as PS3.3 C.7.6.1.1.5 asks. Every object's outcome is reported (sent, with the syntax
    that went out; to retry, for faults that may pass: no association, association lost,
    0xA7xx; or failed, with the peer's status and Error Comment); nothing raises.
    """

    def __init__(
        self, target: str | ForwardTarget | Peer, calling_ae: str, timeout: float = 30.0
    ) -> None:
        if isinstance(target, str):
            target = ForwardTarget.parse(target)
        self.target = ForwardTarget(target.ae_title, target.host, target.port)
        self.calling_ae = calling_ae
        self.timeout = timeout

    def deliver(self, items: list[tuple[str, Path]]) -> Delivery:
        """Send ``(key, file)`` items; the outcomes by key (the forwards' row ids)."""
        if not items:
            return Delivery()
        headers: dict[str, tuple[Path, Dataset]] = {}
        outcomes: dict[str, Outcome] = {}
        for key, path in items:
            try:
                headers[key] = (path, pydicom.dcmread(path, stop_before_pixels=True))
            except Exception as exc:  # an unreadable file is this object's fault
                outcomes[key] = Outcome("failed", error=f"unreadable: {type(exc).__name__}")
        if not headers:
            return Delivery(outcomes)
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = self.timeout
        ae.requested_contexts = _contexts(header for _, header in headers.values())
        connected: list[bool] = []
        assoc = ae.associate(
            self.target.host,
            self.target.port,
            ae_title=self.target.ae_title,
            max_pdu=0,
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda _: connected.append(True))],
        )
        if not assoc.is_established:
            if assoc.is_rejected:
                error = f"association rejected by {self.target}"
            elif assoc.is_aborted and connected:
                error = f"association aborted by {self.target}"
            else:
                error = f"association with {self.target} refused or unreachable"
            log.warning("forwarding: %s", error)
            return Delivery(outcomes, error=error)
        try:
            accepted = {
                (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts
            }
            for key, (path, header) in headers.items():
                outcomes[key] = _send(assoc, path, header, accepted)
        finally:
            if assoc.is_established:
                assoc.release()
        sent = sum(o.state == "sent" for o in outcomes.values())
        log.info("forwarded %d/%d objects to %s", sent, len(items), self.target)
        return Delivery(outcomes, accepted=sorted({syntax for _, syntax in accepted}))

    def __call__(self, paths: list[Path]) -> dict[str, Any]:
        """Send ``paths`` once and report per object (``crgate demo``'s push)."""
        report: dict[str, Any] = {"target": str(self.target), "sent": 0, "failed": []}
        if not paths:
            return report
        delivery = self.deliver([(str(i), path) for i, path in enumerate(paths)])
        if delivery.error is not None:
            report["error"] = delivery.error
            return report
        report["objects"] = []
        for i, path in enumerate(paths):
            outcome = delivery.outcomes[str(i)]
            uid = _uid(path)
            if outcome.state == "sent":
                report["sent"] += 1
                report["objects"].append(
                    {
                        "sop_instance_uid": uid,
                        "state": "sent",
                        "syntax": outcome.syntax,
                        "status": f"0x{outcome.status or 0:04X}",
                    }
                )
            else:
                reason = outcome.error or "failed"
                report["objects"].append(
                    {
                        "sop_instance_uid": uid,
                        "state": "failed",
                        "syntax": outcome.syntax,
                        "reason": reason,
                    }
                )
                report["failed"].append({"file": path.name, "reason": reason})
        return report


def _uid(path: Path) -> str | None:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    except Exception:
        return None


def sender(calling_ae: str) -> Sender:
    """The job context's sender: each association a :class:`DicomForwarder` of its own."""

    def send(peer: Peer, items: list[tuple[str, Path]]) -> Delivery:
        return DicomForwarder(peer, calling_ae).deliver(items)

    return send


def _contexts(headers: Iterable[Dataset]) -> list[Any]:
    """Per SOP class: one context per stored syntax, and one offering both uncompressed ones."""
    stored: dict[str, set[str]] = {}
    for header in headers:
        stored.setdefault(str(header.SOPClassUID), set()).add(
            str(header.file_meta.TransferSyntaxUID)
        )
    contexts = []
    for sop_class, syntaxes in stored.items():
        contexts += [build_context(sop_class, [s]) for s in sorted(syntaxes - set(UNCOMPRESSED))]
        contexts.append(build_context(sop_class, list(UNCOMPRESSED)))
    return contexts[:128]  # PS3.8: at most 128 presentation contexts


SUCCESS = (0x0000, 0xB000, 0xB006, 0xB007)  # success, and the storage warnings


def _send(assoc: Any, path: Path, header: Dataset, accepted: set[tuple[str, str]]) -> Outcome:
    """Send one object as stored, or decoded when the peer took no context for its syntax."""
    sop_class, stored = str(header.SOPClassUID), str(header.file_meta.TransferSyntaxUID)
    syntax: str = stored
    try:
        if (sop_class, stored) in accepted:
            status = assoc.send_c_store(path)
        else:
            found = next((s for s in UNCOMPRESSED if (sop_class, s) in accepted), None)
            if found is None:
                error = "the peer accepted no transfer syntax offered for this object"
                return Outcome("failed", error=error)
            ds = pydicom.dcmread(path)
            if UID(stored).is_compressed:
                ds.decompress(generate_instance_uid=False)  # Lossy Image Compression kept
            ds.file_meta.TransferSyntaxUID = found
            # the peer may pick implicit VR for an explicit VR file: encode as it picked
            ds.set_original_encoding(found.is_implicit_VR, True, ds.original_character_set)
            syntax = str(found)
            status = assoc.send_c_store(ds)
    except Exception as exc:  # a decode or send failure is this object's, not the job's
        what = f"{type(exc).__name__}: {exc}"[:200]
        if not assoc.is_established:
            return Outcome("retry", syntax=syntax, error=f"association lost ({what})")
        return Outcome("failed", syntax=syntax, error=what)
    code = getattr(status, "Status", None)
    if code is None:  # no answer: the association was aborted or timed out
        return Outcome("retry", syntax=syntax, error="no answer to the C-STORE (aborted)")
    if code in SUCCESS:
        return Outcome("sent", syntax=syntax, status=code)
    comment = str(getattr(status, "ErrorComment", "") or "")[:200] or None
    state: Literal["retry", "failed"] = "retry" if is_retryable(code) else "failed"
    return Outcome(state, syntax=syntax, status=code, error=comment)


PROBE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
"""The storage class an echo proposes in every syntax crgate may send, to learn which the peer
accepts (peers accept syntaxes per class; this is a common one)."""
PROBE_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
)


@dataclass(frozen=True)
class EchoResult:
    """What a C-ECHO to a peer answered."""

    reachable: bool
    status: int | None
    rtt_ms: float
    accepted_syntaxes: list[str]
    """Of :data:`PROBE_SYNTAXES`, those the peer accepted for CT Image Storage."""
    error: str | None = None


def echo(target: str, calling_ae: str, timeout: float = 10.0) -> EchoResult:
    """C-ECHO ``target`` (AET@host:port) and learn the storage syntaxes it accepts."""
    parsed = ForwardTarget.parse(target)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    for syntax in PROBE_SYNTAXES:
        ae.add_requested_context(PROBE_SOP_CLASS, syntax)
    started = time.perf_counter()
    assoc = ae.associate(parsed.host, parsed.port, ae_title=parsed.ae_title)
    if not assoc.is_established:
        elapsed = (time.perf_counter() - started) * 1000
        reason = "association rejected" if assoc.is_rejected else "refused or unreachable"
        return EchoResult(False, None, elapsed, [], f"{parsed}: {reason}")
    try:
        accepted = sorted(
            {
                str(cx.transfer_syntax[0])
                for cx in assoc.accepted_contexts
                if str(cx.abstract_syntax) == PROBE_SOP_CLASS
            }
        )
        verification = any(
            str(cx.abstract_syntax) == "1.2.840.10008.1.1" for cx in assoc.accepted_contexts
        )
        status = assoc.send_c_echo() if verification else None
        elapsed = (time.perf_counter() - started) * 1000
    finally:
        assoc.release()
    if not verification:  # a storage-only peer: it answers, it just does not echo
        refused = f"{parsed}: the association was accepted but not the Verification SOP Class"
        return EchoResult(True, None, elapsed, accepted, refused)
    code = getattr(status, "Status", None)
    error = None if code == 0x0000 else f"C-ECHO answered {code!r}"
    return EchoResult(code is not None, code, elapsed, accepted, error)


def push(target: str, calling_ae: str, paths: list[Path]) -> dict[str, Any]:
    """C-STORE ``paths`` to ``target`` (AET@host:port) once: what ``crgate demo`` does as a PACS."""
    return DicomForwarder(target, calling_ae)(paths)
