"""Forward a job's DICOM outputs to a configured PACS by C-STORE (pynetdicom as SCU).

Target from ``CRGATE_FORWARD_TO`` as ``AET@host:port``. Forwarding is best effort after the
result is stored: its outcome goes into the result (sent, with the syntax that went out; failed,
with the peer's status and comment), it never loses or fails the result itself. A peer that
accepts no JPEG 2000 gets the copies decoded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context

from services.core.errors import InvalidParameter

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
    that went out; or failed, with the peer's status and Error Comment); nothing raises.
    """

    def __init__(self, target: str, calling_ae: str) -> None:
        self.target = ForwardTarget.parse(target)
        self.calling_ae = calling_ae

    def __call__(self, paths: list[Path]) -> dict[str, Any]:
        report: dict[str, Any] = {"target": str(self.target), "sent": 0, "failed": []}
        if not paths:
            return report
        headers = {path: pydicom.dcmread(path, stop_before_pixels=True) for path in paths}
        ae = AE(ae_title=self.calling_ae)
        ae.requested_contexts = _contexts(headers.values())
        assoc = ae.associate(
            self.target.host, self.target.port, ae_title=self.target.ae_title, max_pdu=0
        )
        if not assoc.is_established:
            report["error"] = f"association with {self.target} refused or unreachable"
            log.warning("forwarding: %s", report["error"])
            return report
        report["objects"] = []
        try:
            accepted = {
                (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts
            }
            for path, header in headers.items():
                outcome = _send(assoc, path, header, accepted)
                report["objects"].append(outcome)
                if outcome["state"] == "sent":
                    report["sent"] += 1
                else:
                    report["failed"].append({"file": path.name, "reason": outcome["reason"]})
        finally:
            if assoc.is_established:
                assoc.release()
        log.info("forwarded %d/%d objects to %s", report["sent"], len(paths), self.target)
        return report


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


def _send(
    assoc: Any, path: Path, header: Dataset, accepted: set[tuple[str, str]]
) -> dict[str, Any]:
    """Send one object as stored, or decoded when the peer took no context for its syntax."""
    sop_class, stored = str(header.SOPClassUID), str(header.file_meta.TransferSyntaxUID)
    outcome: dict[str, Any] = {"sop_instance_uid": str(header.SOPInstanceUID), "syntax": stored}
    try:
        if (sop_class, stored) in accepted:
            status = assoc.send_c_store(path)
        else:
            syntax = next((s for s in UNCOMPRESSED if (sop_class, s) in accepted), None)
            if syntax is None:
                reason = "the peer accepted no transfer syntax offered for this object"
                return {**outcome, "state": "failed", "reason": reason}
            ds = pydicom.dcmread(path)
            if UID(stored).is_compressed:
                ds.decompress(generate_instance_uid=False)  # Lossy Image Compression kept
            ds.file_meta.TransferSyntaxUID = syntax
            outcome["syntax"] = str(syntax)
            status = assoc.send_c_store(ds)
    except Exception as exc:  # a decode or send failure is this object's, not the job's
        return {**outcome, "state": "failed", "reason": f"{type(exc).__name__}: {exc}"[:200]}
    code = getattr(status, "Status", None)
    if code == 0x0000 or (code is not None and code in (0xB000, 0xB006, 0xB007)):
        return {**outcome, "state": "sent", "status": f"0x{code:04X}"}
    comment = str(getattr(status, "ErrorComment", "") or "") if status else ""
    reason = f"status 0x{code:04X} {comment}".strip() if code is not None else "no reply"
    return {**outcome, "state": "failed", "reason": reason}


def push(target: str, calling_ae: str, paths: list[Path]) -> dict[str, Any]:
    """C-STORE ``paths`` to ``target`` (AET@host:port) once: what ``crgate demo`` does as a PACS."""
    return DicomForwarder(target, calling_ae)(paths)
