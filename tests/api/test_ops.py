"""Readiness, Prometheus metrics after real ingests, and the anonymous-read setting."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.core.config import Settings
from services.core.errors import NotDicom
from services.core.ingest import Channel
from services.runtime import Runtime, build_runtime


def metric(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{selector}}} not in /metrics")


def test_metrics_count_ingests_by_channel_and_failures_by_reason(
    client: TestClient, state: Runtime, tiny_study_files: list[Path]
) -> None:
    before = client.get("/metrics").text
    try:
        stored_before = metric(
            before, "crgate_instances_received_total", channel="dimse", outcome="stored"
        )
    except AssertionError:
        stored_before = 0.0
    for path in tiny_study_files[:2]:
        staged = state.store.new_staging_path()
        shutil.copyfile(path, staged)
        state.ingestor.ingest_file(staged, channel=Channel.DIMSE)
    bad = state.store.new_staging_path()
    bad.write_bytes(b"not dicom")
    with pytest.raises(NotDicom):
        state.ingestor.ingest_file(bad, channel=Channel.DIMSE)
    text = client.get("/metrics").text
    stored = metric(text, "crgate_instances_received_total", channel="dimse", outcome="stored")
    assert stored == stored_before + 2
    assert metric(text, "crgate_bytes_received_total", channel="dimse") >= sum(
        p.stat().st_size for p in tiny_study_files[:2]
    )
    assert metric(text, "crgate_ingest_failures_total", channel="dimse", reason="NotDicom") >= 1
    assert (
        metric(
            text, "crgate_http_request_seconds_count", method="GET", route="/metrics", status="200"
        )
        >= 1
    )


def test_readyz_reports_an_unreachable_broker(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=f"sqlite:///{tmp_path / 'i.db'}",
        broker_url="redis://127.0.0.1:1/0",
    )
    state = build_runtime(settings, create=True)
    try:
        with TestClient(create_app(state=state)) as c:
            response = c.get("/readyz")
    finally:
        state.close()
    assert response.status_code == 503
    assert response.json()["checks"]["broker"].startswith("unreachable")
    assert response.json()["checks"]["database"] == "ok"


def test_anonymous_read_is_off_by_default_and_opens_only_reads(tmp_path: Path) -> None:
    for enabled in (False, True):
        settings = Settings(
            data_dir=tmp_path / f"var-{enabled}",
            database_url=f"sqlite:///{tmp_path / f'i-{enabled}.db'}",
            anonymous_read=enabled,
        )
        state = build_runtime(settings, create=True)
        try:
            with TestClient(create_app(state=state)) as c:
                qido = c.get("/dicomweb/studies")
                stow = c.post(
                    "/dicomweb/studies",
                    content=b"",
                    headers={"Content-Type": "multipart/related; boundary=x"},
                )
                jobs = c.get("/jobs/x")
        finally:
            state.close()
        assert qido.status_code == (200 if enabled else 401)
        assert stow.status_code == 401 and jobs.status_code == 401
