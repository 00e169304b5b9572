"""Ingest errors -> C-STORE status and Error Comment (pure mapping)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.errors import (
    CodecError,
    Conflict,
    InvalidInput,
    InvalidUID,
    NoPixelData,
    NotDicom,
    OutputError,
)
from services.core.ingest import Ingestor
from services.scp.handlers import _stage, status_for

LONG_UID = "2.25." + "1" * 39


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (NotDicom("not a DICOM Part 10 file (File is missing DICOM File Meta)"), 0xC000),
        (NoPixelData(f"instance {LONG_UID} is a CT Image Storage but has no Pixel Data"), 0xA900),
        (InvalidUID(f"SOP Instance UID '{LONG_UID}.0x' is not a valid DICOM UID"), 0xA900),
        (InvalidInput("required attribute(s) missing or empty: SeriesInstanceUID"), 0xA900),
        (Conflict(f"SOP Instance UID {LONG_UID} is already stored with different content"), 0xC010),
        (OutputError("cannot store instance: [Errno 28] No space left on device"), 0xA700),
        (CodecError("a codec failed\\badly"), 0xC000),
        (RuntimeError("anything"), 0xC001),
    ],
)
def test_status_and_comment(exc: Exception, code: int) -> None:
    status, comment = status_for(exc)
    assert status == code
    assert 0 < len(comment) <= 64
    assert "\\" not in comment
    assert comment.isprintable()


def test_comments_name_what_went_wrong() -> None:
    assert status_for(InvalidInput("required attribute(s) missing or empty: SeriesInstanceUID"))[
        1
    ] == ("required attribute(s) missing or empty: SeriesInstanceUID")
    comment = status_for(InvalidUID(f"SOP Instance UID '{LONG_UID}.0x' is not a valid DICOM UID"))[
        1
    ]
    assert comment.startswith("SOP Instance UID '2.25.1111111...") and "not a valid" in comment
    assert status_for(KeyError("x"))[1] == "internal error: KeyError"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_file_received_elsewhere_is_moved_into_incoming(
    ingestor: Ingestor, tmp_path: Path
) -> None:
    received = tmp_path / "elsewhere.dcm"
    received.write_bytes(b"DICM")
    staged = _stage(received, ingestor)
    assert staged.parent == ingestor.store.incoming
    assert staged.read_bytes() == b"DICM"
    assert not received.exists()
