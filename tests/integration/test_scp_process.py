"""`crgate scp` as its own process (as compose runs it): its metrics on --metrics-port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.scp.dcmtk import output, stored_ok, storescu

pytestmark = pytest.mark.tools

CRGATE = Path(sys.executable).with_name("crgate")


def received(metrics_text: str, channel: str) -> dict[str, float]:
    """crgate_instances_received_total of one channel, by outcome."""
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "crgate_instances_received_total" and sample.labels["channel"] == channel
    }


def test_scp_process_serves_its_dimse_metrics(tmp_path: Path, tiny_study_files: list[Path]) -> None:
    data_dir, log = tmp_path / "var", tmp_path / "scp.log"
    dicom_port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRGATE_")}
    made = subprocess.run(  # as compose does: migrate once, then the services
        [str(CRGATE), "migrate", "--data-dir", str(data_dir)], env=env, capture_output=True
    )
    assert made.returncode == 0, made.stderr
    command = [str(CRGATE), "scp", "--data-dir", str(data_dir), "--dicom-port", str(dicom_port)]
    command += ["--metrics-port", str(metrics_port)]
    with log.open("wb") as fh:
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"crgate scp exited early:\n{log.read_text()}"
            try:
                before = httpx.get(url, timeout=2)
                break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"no metrics after 60 s:\n{log.read_text()}"
            time.sleep(0.1)
        assert before.status_code == 200
        assert received(before.text, "dimse") == {}

        pushed = storescu(dicom_port, tiny_study_files[:1], aet="MODALITY")
        assert stored_ok(pushed, 1), output(pushed)

        after = httpx.get(url, timeout=10)
        assert after.status_code == 200
        assert received(after.text, "dimse") == {"stored": 1.0}

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        with pytest.raises(httpx.TransportError):
            httpx.get(url, timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
