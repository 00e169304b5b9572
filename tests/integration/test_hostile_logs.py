"""`crgate serve` given the hostile corpus (tests/hostile.py) by STOW-RS and by C-STORE, on
SQLite and PostgreSQL: every file is refused, nothing is stored, and the whole log of the
process holds none of the corpus's patient values (issue 16)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pydicom
import pynetdicom
import pytest
from pydicom.uid import UID
from pynetdicom import AE

from services.core.dicom.multipart import iter_multipart
from tests import hostile
from tests.integration.test_serve_process import serving

pytestmark = pytest.mark.tools
BOUNDARY = "hostile-corpus"
NOT_NEGOTIABLE = {"unknown-transfer-syntax"}  # C-STORE: no context can carry it


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_hostile_corpus_leaves_no_patient_data_in_the_serve_log(
    tmp_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"CRGATE_LOG_LEVEL": "DEBUG"}
    if backend == "postgresql":
        env["CRGATE_DATABASE_URL"] = request.getfixturevalue("pg_url")
    corpus = hostile.corpus()
    with serving(tmp_path, **env) as served:
        key = (served.data_dir / "admin.key").read_text().strip()
        body = b"".join(
            iter_multipart(
                [({"Content-Type": "application/dicom"}, [d]) for d in corpus.values()], BOUNDARY
            )
        )
        response = httpx.post(
            f"{served.url}/dicomweb/studies",
            content=body,
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            },
            timeout=120,
        )
        assert response.status_code == 409, response.text
        failed = response.json()["00081198"]["Value"]
        assert len(failed) == len(corpus)

        monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
        statuses = {}
        for name, data in corpus.items():
            if name in NOT_NEGOTIABLE:
                continue
            path = tmp_path / f"{name}.dcm"
            path.write_bytes(data)
            meta = pydicom.filereader.read_file_meta_info(path)
            ae = AE(ae_title="PROBE")
            ae.add_requested_context(meta.MediaStorageSOPClassUID, UID(meta.TransferSyntaxUID))
            assoc = ae.associate("127.0.0.1", served.dicom_port, ae_title="CRGATE")
            assert assoc.is_established, name
            try:
                statuses[name] = assoc.send_c_store(path).Status
            finally:
                assoc.release()
        assert all(s in (0xA700, 0xA900) or 0xC000 <= s <= 0xCFFF for s in statuses.values()), (
            statuses
        )
        assert statuses["nul-in-patient-name"] == 0xA900
        assert not list((served.data_dir / "instances").rglob("*.dcm"))
    log = served.log.read_text(errors="replace")
    assert "refused instance via stow" in log and "refused instance via dimse" in log
    for secret in hostile.SECRETS:
        assert secret not in log, f"the serve log ({backend}) holds {secret!r}"
