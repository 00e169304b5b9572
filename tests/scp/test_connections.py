"""Connections a hostile peer opens (issue 16): idle sockets that never send an association
request do not use up the association limit, a PDU longer than the SCP's maximum is refused
before it is read, and the limit still holds for real associations."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AddressInformation

from services.scp.server import MAX_ASSOCIATIONS
from tests.scp.conftest import StartScp
from tests.scp.dcmtk import echoscu, output

P_DATA_TF = 0x04


@contextmanager
def idle_sockets(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` TCP connections that never send a byte."""
    with ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.create_connection(("127.0.0.1", port))) for _ in range(count)
        ]
        yield sockets


def associate_raw(port: int) -> socket.socket:
    """A TCP connection on which an A-ASSOCIATE-RQ (Verification) was sent and accepted."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "PROBE"
    primitive.called_ae_title = "CRGATE"
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 0)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", port)
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16382
    primitive.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(10)
    sock.sendall(pdu.encode())
    head = sock.recv(6, socket.MSG_WAITALL)
    assert head[0] == 0x02, f"not an A-ASSOCIATE-AC: {head!r}"
    sock.recv(struct.unpack(">L", head[2:6])[0], socket.MSG_WAITALL)
    return sock


def test_idle_connections_do_not_block_real_associations(start_scp: StartScp) -> None:
    scp = start_scp(dicom_acse_timeout=30)
    with idle_sockets(scp.port, MAX_ASSOCIATIONS + 8):
        time.sleep(0.5)  # every idle connection has its association thread by now
        started = time.monotonic()
        proc = echoscu(scp.port)
        assert proc.returncode == 0, output(proc)
        assert time.monotonic() - started < 5


def test_idle_connections_are_closed_after_the_acse_timeout(start_scp: StartScp) -> None:
    scp = start_scp(dicom_acse_timeout=1)
    with idle_sockets(scp.port, 1) as (sock,):
        sock.settimeout(10)
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the SCP
        assert time.monotonic() - started < 5


def test_a_pdu_over_the_maximum_is_refused_before_it_is_read(
    start_scp: StartScp, caplog: pytest.LogCaptureFixture
) -> None:
    scp = start_scp(max_pdu_bytes=1 << 20, dicom_network_timeout=60)
    sock = associate_raw(scp.port)
    with sock:
        declared = 600 * 1024 * 1024
        sock.sendall(struct.pack(">BBL", P_DATA_TF, 0, declared) + b"\x00" * 4096)
        started = time.monotonic()
        try:
            answer = sock.recv(6)
        except ConnectionResetError:
            answer = b""
        # closed (or aborted: A-ABORT is PDU type 7) at once, not after the network timeout
        assert answer in (b"", b"\x07") or answer[:1] == b"\x07", answer
        assert time.monotonic() - started < 5
    proc = echoscu(scp.port)
    assert proc.returncode == 0, output(proc)
    assert "over the 1048576 allowed (CRGATE_MAX_PDU_BYTES)" in caplog.text
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_associations_over_the_limit_are_rejected(start_scp: StartScp) -> None:
    scp = start_scp()
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    held = []
    try:
        for _ in range(MAX_ASSOCIATIONS):
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="CRGATE")
            assert assoc.is_established
            held.append(assoc)
        extra = ae.associate("127.0.0.1", scp.port, ae_title="CRGATE")
        assert extra.is_rejected
    finally:
        for assoc in held:
            assoc.release()
    proc = echoscu(scp.port)
    assert proc.returncode == 0, output(proc)
