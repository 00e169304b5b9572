"""STOW-RS with hostile parts (issue 16): each gets its failed-SOP item with a reason, the good
parts around it are stored, the request never fails whole, and no patient value reaches the
response or the log. On SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.core import logredact
from services.runtime import Runtime
from tests import hostile
from tests.api.test_stow import (
    FAILURE_REASON,
    assert_nothing_left,
    failures,
    instance_rows,
    referenced,
    stored_files,
    stow,
    value,
)

ERROR_COMMENT = "00000902"
# the Failure Reason of each hostile part (PS3.18 Table 10.5.3-2 / PS3.4 B.2.3)
REASONS = {
    "nul-in-patient-name": 0xA900,
    "sop-uid-swallows-patient": 0xA900,
    "native-length-mismatch": 0xA900,
    "65535x65535-with-64-bytes": 0xA900,
    "native-labelled-jpeg2000": 0xA900,
    "native-labelled-jpeg": 0xA900,
    "native-labelled-rle": 0xA900,
    "unknown-transfer-syntax": 0xC122,
    "unknown-vr-in-bits-allocated": 0xA900,
    "unknown-vr-in-sop-instance-uid": 0xA900,
    "deflate-bomb": 0xA700,
    "nested-sequences-3000": 0xA900,
}


def test_each_hostile_part_fails_alone_between_good_ones(
    client: TestClient,
    state: Runtime,
    tiny_study_files: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    logredact.install()
    caplog.set_level(logging.DEBUG)
    corpus = hostile.corpus()
    assert sorted(corpus) == sorted(REASONS)
    good = [p.read_bytes() for p in tiny_study_files[:2]]
    response = stow(client, good[0], *corpus.values(), good[1])
    assert response.status_code == 202, response.text
    assert len(referenced(response)) == 2
    failed = failures(response)
    assert [value(item, FAILURE_REASON) for item in failed] == list(REASONS.values())
    for number, item in enumerate(failed, start=2):
        assert value(item, ERROR_COMMENT).startswith(f"part {number}:")
    assert instance_rows(state) == 2 and len(stored_files(state)) == 2
    assert_nothing_left(state)
    for secret in hostile.SECRETS:
        assert secret not in response.text
        assert secret not in caplog.text, f"the log holds {secret!r}"


def test_unknown_transfer_syntax_is_refused_naming_it(client: TestClient, state: Runtime) -> None:
    response = stow(client, hostile.unknown_transfer_syntax())
    assert response.status_code == 409, response.text
    (item,) = failures(response)
    assert value(item, FAILURE_REASON) == 0xC122
    assert "1.2.3.4.5.6" in value(item, ERROR_COMMENT)
    assert instance_rows(state) == 0
