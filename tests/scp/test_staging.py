"""The file pynetdicom streams a received data set into."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from services.scp import staging
from services.scp.staging import WRITEBACK_BYTES, StagingFile


def test_staging_file_writes_everything_and_hands_it_to_the_kernel(tmp_path: Path) -> None:
    fd, name = tempfile.mkstemp(dir=tmp_path)
    fh = StagingFile(fd, name)
    chunks = [os.urandom(131066) for _ in range(2 * WRITEBACK_BYTES // 131066 + 3)]
    for chunk in chunks:
        assert fh.write(chunk) == len(chunk)
        fh.file.flush()
    assert fh._handed >= 2 * WRITEBACK_BYTES - 131066  # write-back started along the way
    fh.close()
    fh.close()  # pynetdicom may close it again
    assert Path(name).read_bytes() == b"".join(chunks)


def test_threads_of_unregistered_aes_get_pynetdicoms_own_temporary_file() -> None:
    staging.install()
    fh = staging._staging_file(delete=False, mode="wb", suffix=".dcm")
    try:
        assert Path(fh.name).parent == Path(tempfile.gettempdir())
        assert not isinstance(fh, StagingFile)
    finally:
        fh.close()
        Path(fh.name).unlink()
