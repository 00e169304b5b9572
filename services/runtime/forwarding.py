"""Forward a job's DICOM outputs to a configured PACS by C-STORE (pynetdicom as SCU).

Target from ``CRGATE_FORWARD_TO`` as ``AET@host:port``. Forwarding is best effort after the
result is stored: its outcome goes into the result (sent, failed, reason), it never loses or
fails the result itself.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
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


class DicomForwarder:
    def __init__(self, target: str, calling_ae: str) -> None:
        self.target = ForwardTarget.parse(target)
        self.calling_ae = calling_ae

    def __call__(self, paths: list[Path]) -> dict[str, Any]:
        report: dict[str, Any] = {"target": str(self.target), "sent": 0, "failed": []}
        if not paths:
            return report
        contexts: dict[str, set[str]] = {}
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            contexts.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
        ae = AE(ae_title=self.calling_ae)
        ae.requested_contexts = [build_context(c, sorted(t)) for c, t in contexts.items()]
        assoc = ae.associate(
            self.target.host, self.target.port, ae_title=self.target.ae_title, max_pdu=0
        )
        if not assoc.is_established:
            report["error"] = f"association with {self.target} refused or unreachable"
            log.warning("forwarding: %s", report["error"])
            return report
        try:
            for path in paths:
                status = assoc.send_c_store(path)
                code = getattr(status, "Status", None)
                if code == 0x0000:
                    report["sent"] += 1
                else:
                    comment = getattr(status, "ErrorComment", "") if status else ""
                    reason = f"status 0x{code:04X} {comment}" if code is not None else "no reply"
                    report["failed"].append({"file": path.name, "reason": reason.strip()})
        finally:
            assoc.release()
        log.info("forwarded %d/%d objects to %s", report["sent"], len(paths), self.target)
        return report


def push(target: str, calling_ae: str, paths: list[Path]) -> dict[str, Any]:
    """C-STORE ``paths`` to ``target`` (AET@host:port) once: what ``crgate demo`` does as a PACS."""
    return DicomForwarder(target, calling_ae)(paths)
