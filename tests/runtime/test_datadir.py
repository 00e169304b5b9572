"""What ``build_runtime`` does at start to the data directory."""

from __future__ import annotations

import os
import time
from pathlib import Path

from services.core.config import Settings
from services.core.storage import InstanceStore
from services.runtime import build_runtime
from services.runtime.datadir import STALE_STAGING_SECONDS


def test_start_drops_only_stale_staged_files(tmp_path: Path) -> None:
    """Another process (the scp beside the api) may be receiving into incoming/ right now."""
    data_dir = tmp_path / "var"
    store = InstanceStore(data_dir)
    store.ensure()
    now = time.time()
    stale, receiving = store.new_staging_path(), store.new_staging_path()
    os.utime(stale, (now - STALE_STAGING_SECONDS - 60, now - STALE_STAGING_SECONDS - 60))
    os.utime(receiving, (now - STALE_STAGING_SECONDS + 60, now - STALE_STAGING_SECONDS + 60))
    state = build_runtime(
        Settings(data_dir=data_dir, database_url=f"sqlite:///{tmp_path / 'i.db'}"), create=True
    )
    state.close()
    assert store.leftover_staging() == [receiving]
