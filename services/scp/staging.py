"""Where pynetdicom streams received C-STORE data sets, and what happens to unfinished ones.

With ``_config.STORE_RECV_CHUNKED_DATASET`` pynetdicom 3.0.4 writes each incoming data set, as it
arrives, to a Part 10 file (128-byte preamble, ``DICM``, file meta built from the command set and
the accepted transfer syntax, then the data set bytes as received) made by
``tempfile.NamedTemporaryFile(delete=False)`` in ``pynetdicom.dimse_messages``, i.e. in ``/tmp``.
It never removes the file of a transfer that does not finish (an A-ABORT or a dropped connection).

``install()`` swaps that module's ``NamedTemporaryFile`` for a factory that, when the receiving
association belongs to a registered AE, creates the file as ``<data-dir>/incoming/stage-*.dcm``
(the same filesystem as the store: ingest links it into place without copying; a crash leaves a
``stage-*`` file that the next start removes), writes it through ``StagingFile`` (early
write-back) and remembers it as *in transfer*. The C-STORE handler ``claim``s its file; when the
connection closes, files nobody claimed are removed. Written against pynetdicom 3.0.4 internals;
tests/scp/test_abort.py fails if the swap stops taking effect.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import pynetdicom.dimse_messages
from pynetdicom import _config
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association

log = logging.getLogger(__name__)

_ORIGINAL = tempfile.NamedTemporaryFile


class Transfers:
    """Data sets of one AE's associations still being received (not yet claimed)."""

    def __init__(self, incoming: Path) -> None:
        self.incoming = incoming
        self._lock = threading.Lock()
        self._open: dict[Association, set[Path]] = {}

    def open_file(self, assoc: Association) -> StagingFile:
        fd, name = tempfile.mkstemp(prefix="stage-", suffix=".dcm", dir=self.incoming)
        with self._lock:
            self._open.setdefault(assoc, set()).add(Path(name))
        return StagingFile(fd, name)

    def claim(self, assoc: Association, path: Path) -> bool:
        """Take ``path`` over from the transfer; False if it was already dropped."""
        with self._lock:
            paths = self._open.get(assoc)
            if paths is None or path not in paths:
                return False
            paths.discard(path)
            return True

    def drop(self, assoc: Association) -> int:
        """Remove the association's unclaimed files (its connection is closed); their count."""
        with self._lock:
            paths = self._open.pop(assoc, set())
        for path in paths:
            path.unlink(missing_ok=True)
        if paths:
            _close_files(assoc)
        return len(paths)

    def drop_all(self) -> int:
        with self._lock:
            associations = list(self._open)
        return sum(self.drop(assoc) for assoc in associations)


_registry: weakref.WeakKeyDictionary[ApplicationEntity, Transfers] = weakref.WeakKeyDictionary()
_install_lock = threading.Lock()


def register(ae: ApplicationEntity, incoming: Path) -> Transfers:
    """Stream the data sets this AE receives into ``incoming`` (see the module docstring)."""
    install()
    transfers = Transfers(incoming)
    _registry[ae] = transfers
    return transfers


def unregister(ae: ApplicationEntity) -> None:
    _registry.pop(ae, None)


def install() -> None:
    """Turn on chunked receiving and the ``NamedTemporaryFile`` swap (idempotent, process-wide)."""
    with _install_lock:
        _config.STORE_RECV_CHUNKED_DATASET = True
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            # pynetdicom's "standard" handlers only write DEBUG lines, but run for every PDU
            _config.LOG_HANDLER_LEVEL = "none"
        module: Any = pynetdicom.dimse_messages
        if module.NamedTemporaryFile is not _staging_file:
            module.NamedTemporaryFile = _staging_file


def _staging_file(*args: Any, **kwargs: Any) -> IO[bytes] | StagingFile:
    # pynetdicom calls this from the association's DUL thread, which knows its association
    assoc: Association | None = getattr(threading.current_thread(), "assoc", None)
    transfers = _registry.get(assoc.ae) if assoc is not None else None
    if transfers is None or assoc is None:
        fh: IO[bytes] = _ORIGINAL(*args, **kwargs)
        return fh
    return transfers.open_file(assoc)


class StagingFile:
    """The file pynetdicom writes a received data set into (it calls write, file.flush, close).

    Unbuffered; every ``WRITEBACK_BYTES`` written are handed to the kernel for write-out
    (``sync_file_range``, Linux) while the rest still arrives, so the fsync before the C-STORE
    response has little left to wait for. Durability still comes from that fsync.
    """

    def __init__(self, fd: int, name: str) -> None:
        self.name = name
        self.file = self  # pynetdicom flushes ``.file``
        self._fd: int | None = fd
        self._written = 0
        self._handed = 0

    def write(self, data: bytes) -> int:
        assert self._fd is not None, "write to a closed staging file"
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._written += len(data)
        if self._written - self._handed >= WRITEBACK_BYTES:
            _start_writeback(self._fd, self._handed, self._written - self._handed)
            self._handed = self._written
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


WRITEBACK_BYTES = 4 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    function = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_sync_file_range = _load_sync_file_range()


def _start_writeback(fd: int, offset: int, length: int) -> None:
    if _sync_file_range is not None:  # a failure only means the fsync does all the work
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _close_files(assoc: Association) -> None:
    """Close the file handles pynetdicom still holds for the association's dropped transfers."""
    message = getattr(assoc.dimse, "message", None)
    handles = [getattr(message, "_data_set_file", None)]
    with contextlib.suppress(Exception):
        handles += [getattr(item[1], "_dataset_file", None) for item in assoc.dimse.msg_queue.queue]
    for handle in handles:
        if handle is not None:
            with contextlib.suppress(Exception):
                handle.close()
