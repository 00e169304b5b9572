"""Re-sends through dcmtk's storescu: the same instance in another transfer syntax is a
duplicate (success, nothing rewritten); other content under a stored SOP Instance UID follows
CRGATE_DUPLICATE_POLICY (keep-first: warning 0xB000 with a comment; refuse, 0xC010:
tests/scp/test_store.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pytest
from sqlalchemy.orm import Session, sessionmaker

from services.core.storage import InstanceStore
from services.scp.server import ScpServer
from tests.scp.conftest import stored_rows
from tests.scp.dcmtk import output, stored_ok, storescu

pytestmark = [pytest.mark.tools, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]


def statuses(text: str) -> list[str]:
    """The DIMSE Status lines storescu -d printed (``0x0000: Success`` ...)."""
    return [s.lower() for s in re.findall(r"DIMSE Status\s+: (0x[0-9A-Fa-f]{4}: [^\n]*)", text)]


def test_a_resend_in_implicit_vr_is_a_duplicate(
    scp: ScpServer,
    tiny_study_files: list[Path],
    sessions: sessionmaker[Session],
    store: InstanceStore,
) -> None:
    """Stored in explicit VR, sent again in implicit VR (storescu converts it): 0x0000 (before:
    0xC010, which storescu shows as "CannotUnderstand"); the stored file is not rewritten."""
    first = storescu(scp.port, tiny_study_files[:1])
    assert stored_ok(first, 1), output(first)
    (row,) = stored_rows(sessions)
    stored = store.absolute(row.path)
    before = (stored.read_bytes(), stored.stat().st_ino, stored.stat().st_mtime_ns)

    again = storescu(scp.port, tiny_study_files[:1], "-xi")
    assert "Accepted Transfer Syntax: =LittleEndianImplicit" in output(again)
    assert statuses(output(again)) == ["0x0000: success"], output(again)
    (row,) = stored_rows(sessions)
    assert (row.transfer_syntax_uid, row.replaced_count) == ("1.2.840.10008.1.2.1", 0)
    assert (stored.read_bytes(), stored.stat().st_ino, stored.stat().st_mtime_ns) == before
    assert list(store.incoming.iterdir()) == []


def _altered(path: Path, tmp_path: Path) -> Path:
    ds = pydicom.dcmread(path)
    ds.SeriesDescription = "another description"
    out = tmp_path / "altered.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def test_other_content_keeps_the_stored_instance_with_a_warning(
    scp: ScpServer,
    tiny_study_files: list[Path],
    sessions: sessionmaker[Session],
    store: InstanceStore,
    tmp_path: Path,
) -> None:
    first = storescu(scp.port, tiny_study_files[:1])
    assert stored_ok(first, 1), output(first)
    (row,) = stored_rows(sessions)
    before = store.absolute(row.path).read_bytes()
    again = storescu(scp.port, [_altered(tiny_study_files[0], tmp_path)])
    text = output(again)
    assert again.returncode == 0, text
    (status,) = statuses(text)
    assert status.startswith("0xb000"), text
    assert "already stored with other content; stored one kept" in text
    (row,) = stored_rows(sessions)
    assert store.absolute(row.path).read_bytes() == before
