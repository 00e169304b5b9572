"""Filesystem instance store.

Layout under the data directory::

    incoming/   staged uploads (temp names; never read by anyone else)
    instances/<study>/<series>/<sop>.dcm
    replaced/   older copies kept when a SOP Instance UID is replaced
    locks/      256 lock files; ``lock(uid)`` takes one (flock) across every process

Files are written to ``incoming/`` first, fsynced, then hard-linked into place (which fails if a
file is already there, so two writers never clobber each other) and the directory is fsynced.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from services.core.dicom.uids import validate_uid
from services.core.errors import NotFound, OutputError

LOCK_STRIPES = 256


class InstanceStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir).resolve()
        self.incoming = self.root / "incoming"
        self.instances = self.root / "instances"
        self.replaced = self.root / "replaced"
        self.locks = self.root / "locks"

    def ensure(self) -> None:
        """Create the store's directories; raise OutputError when that is impossible."""
        try:
            for directory in (self.incoming, self.instances, self.replaced, self.locks):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"data directory {self.root}: {exc.strerror or exc}") from None

    def writable(self) -> bool:
        """True when a file can be created and removed in ``incoming/`` (readiness check)."""
        try:
            with tempfile.TemporaryFile(dir=self.incoming):
                return True
        except OSError:
            return False

    # -- staging -------------------------------------------------------------------------------

    def new_staging_path(self, suffix: str = ".dcm") -> Path:
        """A fresh, empty file in ``incoming/`` that the caller fills and hands to ``place``."""
        fd, name = tempfile.mkstemp(prefix="stage-", suffix=suffix, dir=self.incoming)
        os.close(fd)
        return Path(name)

    @contextlib.contextmanager
    def staging(self) -> Iterator[tuple[Path, BinaryIO]]:
        """Yield (path, file) in ``incoming/``; the file is removed if the block raises."""
        path = self.new_staging_path()
        try:
            with path.open("wb") as fh:
                yield path, fh
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    # -- locking -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, uid: str) -> Iterator[None]:
        """Hold the exclusive flock of ``uid``'s stripe (one of LOCK_STRIPES files in ``locks/``).

        Every process sharing the data directory (api, scp) serialises on it; so do two
        threads of one process, since each call opens the file anew.
        """
        path = self.locks / f"{zlib.crc32(uid.encode()) % LOCK_STRIPES:02x}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            self.locks.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the last descriptor releases the lock

    # -- placement -----------------------------------------------------------------------------

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """The store-relative path of an instance; every UID is validated first."""
        validate_uid(study_uid, "Study Instance UID")
        validate_uid(series_uid, "Series Instance UID")
        validate_uid(sop_uid, "SOP Instance UID")
        return f"instances/{study_uid}/{series_uid}/{sop_uid}.dcm"

    def absolute(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if self.root not in path.parents:
            raise NotFound(f"stored path {relative!r} lies outside the data directory")
        return path

    def place(self, staged: Path, relative: str) -> Path:
        """Make ``staged`` durable at ``relative``; FileExistsError if something is there already.

        The staged file is removed on success; on FileExistsError it is left for the caller.
        """
        target = self.absolute(relative)
        _fsync(staged)
        created = _makedirs(target.parent)
        os.link(staged, target)
        _fsync(target.parent)
        for directory in created:
            _fsync(directory.parent)
        staged.unlink()
        return target

    def replace(self, staged: Path, relative: str) -> Path:
        """Put ``staged`` at ``relative``, keeping the previous file under ``replaced/``."""
        target = self.absolute(relative)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        keep = self.replaced / f"{target.stem}.{stamp}.dcm"
        _fsync(staged)
        os.link(target, keep)
        _fsync(keep.parent)
        staged.replace(target)
        _fsync(target.parent)
        return target

    def remove(self, relative: str) -> None:
        path = self.absolute(relative)
        path.unlink(missing_ok=True)
        _fsync(path.parent)

    def open(self, relative: str) -> BinaryIO:
        try:
            return self.absolute(relative).open("rb")
        except FileNotFoundError:
            raise NotFound(f"the file of stored instance {relative!r} is missing") from None

    def leftover_staging(self) -> list[Path]:
        """Staged files nobody finished (a crash or a dropped connection left them)."""
        return sorted(self.incoming.glob("stage-*"))


def _makedirs(directory: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (outermost first)."""
    missing: list[Path] = []
    probe = directory
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir()
    return list(reversed(missing))


def _fsync(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes new names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
