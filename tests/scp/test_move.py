"""C-MOVE to a registered destination (dcmtk movescu asks, dcmtk storescp receives); an AE title
not in the registry gets 0xA801."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy.orm import Session, sessionmaker

from services.core.destinations import DestinationSpec, create_destination
from services.scp.server import ScpServer
from tests.dicomtools import require
from tests.scp import dcmtk
from tests.scp.dcmtk import output
from tests.scp.test_queryretrieve import final_status, studies  # noqa: F401 (fixture)

pytestmark = [pytest.mark.tools, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A plain storescp (uncompressed syntaxes only) as the move destination."""
    out = tmp_path / "pacs"
    out.mkdir()
    with dcmtk.storescp(into=out) as port:
        yield port, out


def movescu(port: int, destination: str, *keys: str) -> subprocess.CompletedProcess[str]:
    exe = require("movescu", "dcmtk")
    args = [arg for key in keys for arg in ("-k", key)]
    return subprocess.run(
        [exe, "-d", "-S", "-aet", "MOVER", "-aec", "CRGATE", "-aem", destination, *args,
         "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip


def test_move_a_study_to_a_registered_destination(
    scp: ScpServer,
    sessions: sessionmaker[Session],
    studies: list[Path],  # noqa: F811
    pacs: tuple[int, Path],
) -> None:
    port, received = pacs
    with sessions.begin() as session:
        create_destination(
            session, DestinationSpec("main PACS", "PACS", "127.0.0.1", port), actor="test"
        )
    first = pydicom.dcmread(studies[0])
    proc = movescu(
        scp.port, "PACS", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={first.StudyInstanceUID}"
    )
    assert final_status(output(proc)) == "0x0000", output(proc)
    completed = re.findall(r"Completed Suboperations\s+: (\d+)", output(proc))
    failed = re.findall(r"Failed Suboperations\s+: (\d+)", output(proc))
    assert (completed[-1], failed[-1]) == ("4", "0"), output(proc)
    got = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in received.iterdir()}
    for path in studies[:4]:
        sent = pydicom.dcmread(path)
        assert (got[str(sent.SOPInstanceUID)].pixel_array == sent.pixel_array).all()


def test_a_compressed_instance_goes_decoded_to_a_destination_without_jpeg_2000(
    scp: ScpServer,
    sessions: sessionmaker[Session],
    studies: list[Path],  # noqa: F811
    pacs: tuple[int, Path],
) -> None:
    port, received = pacs
    with sessions.begin() as session:
        create_destination(
            session, DestinationSpec("main PACS", "PACS", "127.0.0.1", port), actor="test"
        )
    mr = pydicom.dcmread(studies[-1])  # JPEG 2000 lossless
    proc = movescu(
        scp.port, "PACS", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={mr.StudyInstanceUID}"
    )
    assert final_status(output(proc)) == "0x0000", output(proc)
    (path,) = received.iterdir()
    kept = pydicom.dcmread(path)
    assert kept.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
    assert (kept.pixel_array == mr.pixel_array).all()


def test_an_unknown_move_destination_gets_a801(
    scp: ScpServer,
    studies: list[Path],  # noqa: F811
) -> None:
    first = pydicom.dcmread(studies[0])
    proc = movescu(
        scp.port,
        "NOSUCHAE",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={first.StudyInstanceUID}",
    )
    assert final_status(output(proc)) == "0xa801", output(proc)
