"""Index tables. Files hold the data; these rows make it findable (QIDO) and accountable."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utc_now() -> datetime:
    """Row timestamps from Python: SQLite's CURRENT_TIMESTAMP has whole seconds, so two rows made
    in one second would tie when ordered newest first."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_name: Mapped[str | None] = mapped_column(String(324), index=True)
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_id: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician_name: Mapped[str | None] = mapped_column(String(324))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utc_now, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Series(Base):
    __tablename__ = "series"

    series_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("studies.study_uid", ondelete="CASCADE"), index=True
    )
    modality: Mapped[str | None] = mapped_column(String(16), index=True)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utc_now, server_default=func.now()
    )


class Instance(Base):
    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("series.series_uid", ondelete="CASCADE"), index=True
    )
    study_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("studies.study_uid", ondelete="CASCADE"), index=True
    )
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    bits_allocated: Mapped[int | None] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(String(512))
    channel: Mapped[str] = mapped_column(String(16))
    source: Mapped[str | None] = mapped_column(String(64))
    replaced_count: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utc_now, server_default=func.now()
    )
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Destination(Base):
    """A PACS crgate forwards to (C-STORE) and that C-MOVE may name by its AE title."""

    __tablename__ = "destinations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    ae_title: Mapped[str] = mapped_column(String(16), unique=True)
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    # transfer syntaxes it accepts; None until detected at the first association
    syntaxes: Mapped[list[str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utc_now, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utc_now, server_default=func.now()
    )


Index("ix_instances_study_series", Instance.study_uid, Instance.series_uid)


class Forward(Base):
    """One object sent (or to send) to one destination: its state, attempts and the peer's
    last answer. The destination's name is kept, so a row outlives a deleted destination."""

    __tablename__ = "forwards"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    destination_id: Mapped[int | None] = mapped_column(
        Integer, ForeignKey("destinations.id", ondelete="SET NULL"), index=True
    )
    destination: Mapped[str] = mapped_column(String(64))
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    what: Mapped[str] = mapped_column(String(16))  # original, compressed, result
    job_id: Mapped[str | None] = mapped_column(String(36), index=True)
    # the file under the store root, for a copy kept out of the index (else found by UID)
    path: Mapped[str | None] = mapped_column(String(512))
    state: Mapped[str] = mapped_column(String(16))  # queued sending sent retrying failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    syntax: Mapped[str | None] = mapped_column(String(64))  # the transfer syntax that went out
    status: Mapped[str | None] = mapped_column(String(8))  # the peer's status, 0xNNNN
    error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utc_now, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utc_now, server_default=func.now()
    )
    requested_by: Mapped[str | None] = mapped_column(String(128))


Index("ix_forwards_state_next", Forward.state, Forward.next_attempt_at)


class Policy(Base):
    """A site's CR policy for (modality, body part, pediatric); None/"*" means any."""

    __tablename__ = "policies"
    __table_args__ = (UniqueConstraint("modality", "body_part", "pediatric", name="uq_policy_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    modality: Mapped[str] = mapped_column(String(16))  # "*" = any modality (the default policy)
    body_part: Mapped[str] = mapped_column(String(16), default="*")
    pediatric: Mapped[str] = mapped_column(String(3), default="*")  # yes, no, *
    cr: Mapped[float] = mapped_column(Float)
    syntax: Mapped[str] = mapped_column(String(16))
    auto_classify: Mapped[bool] = mapped_column(Boolean, default=False)
    auto_compress: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # compressed copies go into the study as a derived series (False: only to destinations)
    keep_copy: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    forward_to: Mapped[list[str] | None] = mapped_column(JSON)  # destination names
    forward_what: Mapped[list[str] | None] = mapped_column(JSON)  # originals, compressed, results
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    quiet_seconds: Mapped[int] = mapped_column(Integer, default=120)
    preset: Mapped[str | None] = mapped_column(String(16))
    max_cr: Mapped[float | None] = mapped_column(Float)  # the preset's accepted maximum, if any
    override_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utc_now, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    entity: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[str | None] = mapped_column(String(64))
    before: Mapped[Any] = mapped_column(JSON, nullable=True)
    after: Mapped[Any] = mapped_column(JSON, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text)


class Job(Base):
    """One classification or compression request; idempotency_key makes asking twice give the
    same job."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="classify", server_default="classify")
    # what the job does with its outputs: keep_copy, forward_to, forward_what
    options: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    cr: Mapped[float] = mapped_column(Float)
    syntax: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(64))
    model_sha256: Mapped[str] = mapped_column(String(64))
    requested_cr: Mapped[float | None] = mapped_column(Float)
    policy_id: Mapped[int | None] = mapped_column(Integer)
    policy_source: Mapped[str] = mapped_column(String(128))
    trigger: Mapped[str] = mapped_column(String(16))  # api, arrival, cli
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    result_id: Mapped[str | None] = mapped_column(String(36))
    requested_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utc_now, server_default=func.now()
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str | None] = mapped_column(String(128))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # the SOP Instance UIDs the job classifies (None: a job made before they were stored)
    instance_uids: Mapped[list[str] | None] = mapped_column(JSON)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # last sent


class Result(Base):
    __tablename__ = "results"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    payload: Mapped[Any] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utc_now, server_default=func.now()
    )


class StudyArrival(Base):
    """When a study's instances last arrived, for the readiness tracker.

    ``settled_at`` is set by housekeeping once nothing is left to do for the study (no policy
    auto-classifies it, or its job was made); an arriving instance clears it.
    """

    __tablename__ = "study_arrivals"

    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    last_arrival: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    classified_count: Mapped[int] = mapped_column(Integer, default=0)  # count at last auto job
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# housekeeping reads the unsettled studies only: this index holds just those rows, so that read
# costs the same however many settled studies the index has (and whatever the statistics say)
_UNSETTLED = StudyArrival.settled_at.is_(None)
Index(
    "ix_study_arrivals_unsettled",
    StudyArrival.study_uid,
    sqlite_where=_UNSETTLED,
    postgresql_where=_UNSETTLED,
)


class Sweep(Base):
    """A CR safety study run as a job (`POST /studies:cr-sweep`); its report lives on disk."""

    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    params: Mapped[Any] = mapped_column(JSON)
    summary: Mapped[Any] = mapped_column(JSON, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text)
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    progress_what: Mapped[str | None] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    requested_by: Mapped[str | None] = mapped_column(String(128))
    worker: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utc_now, server_default=func.now()
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # last sent
