"""Reading and writing DICOM Part 10 files; writes are atomic (temp name, fsync, rename)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from services.core.errors import NotDicom, OutputError


def read_dataset(path: Path) -> Dataset:
    """Read a Part 10 file fully; raise NotDicom with the reason when it is not one."""
    try:
        ds = pydicom.dcmread(path, force=False)
    except FileNotFoundError:
        raise NotDicom(f"{path}: no such file") from None
    except IsADirectoryError:
        raise NotDicom(f"{path}: is a directory, not a DICOM file") from None
    except PermissionError:
        raise NotDicom(f"{path}: permission denied") from None
    except InvalidDicomError as exc:
        raise NotDicom(f"{path}: not a DICOM Part 10 file ({exc})") from None
    except RecursionError:
        raise NotDicom(f"{path}: sequences nest too deeply to be read") from None
    except (
        EOFError,
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        NotImplementedError,
    ) as exc:
        raise NotDicom(f"{path}: unreadable or truncated DICOM file ({exc})") from None
    if "TransferSyntaxUID" not in ds.file_meta:
        raise NotDicom(f"{path}: DICOM file has no Transfer Syntax UID in its file meta")
    short = _short_element(ds)
    if short:
        raise NotDicom(f"{path}: truncated DICOM file (element {short} ends past the end of file)")
    return ds


def _short_element(ds: Dataset) -> str | None:
    """The tag of an element whose value is shorter than its declared length, if any.

    pydicom stops quietly at the end of a file cut in the middle of an element.
    """
    for raw in ds._dict.values():
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if (
            isinstance(length, int)
            and length != 0xFFFFFFFF
            and isinstance(value, bytes)
            and len(value) < length
        ):
            return str(raw.tag)
    return None


@contextlib.contextmanager
def atomic_output(path: Path, *, private: bool = False) -> Iterator[BinaryIO]:
    """Yield a temp file beside ``path``; on success fsync it and rename it into place.

    On any failure the temp file is removed, so no partial output is ever visible. A
    ``private`` file (crgate's own store of patient data) stays 0600; others follow the umask.
    """
    path = Path(path)
    directory = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write output ({exc.strerror or exc})") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if not private:
                os.fchmod(fh.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600
            os.fsync(fh.fileno())
        tmp.replace(path)
        _fsync_dir(directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_dataset(ds: Dataset, path: Path, *, private: bool = False) -> int:
    """Write ``ds`` as a Part 10 file atomically (0600 when ``private``); return the number
    of bytes written."""
    try:
        with atomic_output(path, private=private) as fh:
            ds.save_as(fh, enforce_file_format=True)
            size = fh.tell()
    except OSError as exc:
        raise OutputError(f"{path}: cannot write output ({exc.strerror or exc})") from None
    return size
