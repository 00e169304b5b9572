"""The ingest path refuses hostile files with a reason, stores nothing of them, and never puts
their patient values in an error or a log line (issue 16), on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session, sessionmaker

from services.core import logredact
from services.core.db.engine import make_engine
from services.core.db.tables import Instance, Study
from services.core.dicom.validation import NestedTooDeep
from services.core.errors import (
    CrgateError,
    InvalidInput,
    InvalidUID,
    TooLarge,
    UnsupportedSyntax,
)
from services.core.ingest import Channel, Ingestor
from services.core.storage import InstanceStore
from tests import hostile

EXPECTED: dict[str, tuple[type[CrgateError], str]] = {
    "nul-in-patient-name": (InvalidInput, "NUL"),
    "sop-uid-swallows-patient": (InvalidUID, "SOP Instance UID"),
    "native-length-mismatch": (InvalidInput, "Pixel Data holds 100 bytes"),
    "65535x65535-with-64-bytes": (InvalidInput, "65535 rows x 65535 columns"),
    "native-labelled-jpeg2000": (InvalidInput, "JPEG 2000"),
    "native-labelled-jpeg": (InvalidInput, "JPEG Baseline"),
    "native-labelled-rle": (InvalidInput, "RLE Lossless"),
    "unknown-transfer-syntax": (UnsupportedSyntax, "1.2.3.4.5.6"),
    "unknown-vr-in-bits-allocated": (InvalidInput, "(0028,0100)"),
    "unknown-vr-in-sop-instance-uid": (InvalidInput, "(0008,0018)"),
    "deflate-bomb": (TooLarge, "CRGATE_MAX_INFLATED_BYTES"),
    "nested-sequences-3000": (NestedTooDeep, "nest"),
}


@pytest.fixture(scope="module")
def corpus() -> dict[str, bytes]:
    return hostile.corpus()


def _stage(store: InstanceStore, data: bytes) -> Path:
    staged = store.new_staging_path()
    staged.write_bytes(data)
    return staged


def test_the_corpus_and_the_expectations_name_the_same_files(corpus: dict[str, bytes]) -> None:
    assert sorted(corpus) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_file_is_refused_with_a_reason_and_leaves_nothing(
    name: str,
    corpus: dict[str, bytes],
    ingestor: Ingestor,
    store: InstanceStore,
    sessions: sessionmaker[Session],
    caplog: pytest.LogCaptureFixture,
) -> None:
    logredact.install()
    caplog.set_level(logging.DEBUG)
    error, reason = EXPECTED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # pydicom's warnings reach the log, as in a server
        with pytest.raises(error) as caught:
            ingestor.ingest_file(_stage(store, corpus[name]), channel=Channel.STOW)
    assert reason in str(caught.value)
    with sessions() as session:
        assert list(session.scalars(select(Instance))) == []
        assert list(session.scalars(select(Study))) == []
    assert [p for p in store.root.rglob("*") if p.is_file() and p.name != ".lock"] == [], name
    for secret in hostile.SECRETS:
        assert secret not in str(caught.value)
        assert secret not in caplog.text, f"{name}: the log holds {secret!r}"


def test_a_deflated_instance_under_the_limit_is_stored(
    ingestor: Ingestor, store: InstanceStore
) -> None:
    ingestor.max_inflated_bytes = 200 * 1024**2
    result = ingestor.ingest_file(
        _stage(store, hostile.deflate_bomb(8 * 1024**2)), channel=Channel.STOW
    )
    assert result.outcome == "stored"


def test_sequences_a_few_hundred_levels_deep_are_refused(
    ingestor: Ingestor, store: InstanceStore
) -> None:
    for depth in (40, 400):
        with pytest.raises(NestedTooDeep):
            ingestor.ingest_file(
                _stage(store, hostile.nested_sequences(depth)), channel=Channel.STOW
            )


def test_a_sop_class_other_than_announced_is_refused(
    ingestor: Ingestor, store: InstanceStore
) -> None:
    with pytest.raises(InvalidInput, match="sent as MR Image Storage but is CT Image Storage"):
        ingestor.ingest_file(
            _stage(store, hostile.part10(hostile.image())),
            channel=Channel.DIMSE,
            expected_sop_class_uid=hostile.MR,
        )


def test_index_errors_never_show_statement_parameters(pg_url: str) -> None:
    """PostgreSQL refuses NUL in text; its error does not quote the statement's parameters."""
    engine = make_engine(pg_url)
    try:
        with pytest.raises(DataError) as caught, engine.begin() as conn:
            conn.execute(text("SELECT CAST(:name AS text)"), {"name": "SECRETNAME\x00"})
    finally:
        engine.dispose()
    assert "SECRETNAME" not in str(caught.value)
    assert "hidden due to hide_parameters" in str(caught.value)


def test_quoted_values_are_withheld_unless_they_look_like_uids() -> None:
    message = "Invalid value for VR UI: '1.2.3\\x08\\x00PN SECRETNAME^HOSTILE'. And '1.2.840'"
    redacted = logredact.withhold_values(message)
    assert "SECRETNAME" not in redacted and "'1.2.840'" in redacted
    assert "19450317" not in logredact.withhold_values("Invalid value for VR DA: '19450317'")
