"""A C-STORE SCU that stops half-way: ``python partial_sender.py PORT FILE``.

It associates, sends the C-STORE command and part of the data set's P-DATA, prints ``partial``
and then waits for a line on stdin: ``abort`` sends an A-ABORT; otherwise the test kills it.
"""

from __future__ import annotations

import sys
import time
from io import BytesIO

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

FRAGMENT = 16384


def main(port: int, path: str) -> None:
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="PARTIAL")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CRGATE")
    assert assoc.is_established, "association not accepted"
    context_id = assoc.accepted_contexts[0].context_id
    assert context_id is not None

    encoded = encode(ds, is_implicit_vr=False, is_little_endian=True)
    assert encoded is not None, "the data set cannot be encoded"
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(encoded)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    fragments = list(message.encode_msg(context_id, FRAGMENT))
    assert len(fragments) > 4, "the file is too small to stop half-way"
    for fragment in fragments[: len(fragments) // 2]:
        assoc.dul.send_pdu(fragment)
    time.sleep(0.2)  # let the DUL thread put them on the wire
    print("partial", flush=True)
    if sys.stdin.readline().strip() == "abort":
        assoc.abort()
        print("aborted", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
