"""Decoded frames kept for the next request: the console asks for the same image four times
(original, copy, difference, saliency) and again at each zoom, and a 13.6 MP JPEG 2000 copy
takes about 0.4 s to decode.

Least recently used out, within a byte budget; a frame is known by its file's path, size and
modification time, so a replaced file is decoded again. Arrays come back read-only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy.typing as npt
from pydicom.dataset import Dataset

from services.core.retrieve.frames import decode
from services.core.retrieve.lookup import StoredInstance

Key = tuple[str, int, int, int]


class FrameCache:
    """Decoded frames within ``max_bytes`` (a frame larger than that is not kept)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._frames: OrderedDict[Key, npt.NDArray[Any]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def frame(self, instance: StoredInstance, ds: Dataset, index: int) -> npt.NDArray[Any]:
        """Frame ``index`` (0-based) of ``instance`` whose dataset ``ds`` was read from it."""
        stat = instance.path.stat()
        key = (str(instance.path), stat.st_size, stat.st_mtime_ns, index)
        with self._lock:
            found = self._frames.get(key)
            if found is not None:
                self._frames.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        array = decode(ds, index, instance.source)  # outside the lock: decodes run in parallel
        array.flags.writeable = False
        self._keep(key, array)
        return array

    def _keep(self, key: Key, array: npt.NDArray[Any]) -> None:
        if array.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._frames:
                return
            self._frames[key] = array
            self._bytes += array.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._frames.popitem(last=False)
                self._bytes -= old.nbytes

    @property
    def size_bytes(self) -> int:
        return self._bytes
