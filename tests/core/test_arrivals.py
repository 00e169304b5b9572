"""Study arrival: the ingest observer only records the arrival (one statement, whatever the
policies); housekeeping decides readiness for unsettled studies only and settles the others.

On SQLite and PostgreSQL (the ``database_url`` fixture); jobs are sent to a list, not run.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, text, update
from sqlalchemy.orm import Session, sessionmaker

from services.core import arrivals, jobs
from services.core.arrivals import ArrivalTracker, record_arrival
from services.core.classify import JobContext, prepare
from services.core.config import Settings
from services.core.contracts import ClassifyPayload, JobTrigger, Payload
from services.core.db.tables import Job, StudyArrival
from services.core.ingest import Channel, Ingestor, IngestResult, Outcome
from services.core.policies import PolicyKey, ensure_default_policy, set_policy
from services.core.storage import InstanceStore


@dataclass
class Gate:
    """A tracker on a real index and store; its queue keeps what it is sent."""

    ctx: JobContext
    engine: Engine
    files: list[Path]  # four small mammograms of one study
    sent: list[Payload] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tracker = ArrivalTracker(self.ctx, self)

    def enqueue(self, payload: Payload) -> None:
        self.sent.append(payload)

    @property
    def job_ids(self) -> list[str]:
        return [p.job_id for p in self.sent if isinstance(p, ClassifyPayload)]

    def mg_policy(self, **changes: Any) -> None:
        key = PolicyKey.of("MG", changes.pop("body_part", None))
        with self.ctx.sessions.begin() as session:
            set_policy(session, key, changes, actor="test")

    def store(self, paths: list[Path]) -> list[IngestResult]:
        results = []
        for path in paths:
            staged = self.ctx.store.new_staging_path()
            staged.write_bytes(path.read_bytes())
            results.append(self.ctx.ingestor.ingest_file(staged, channel=Channel.DIMSE))
        return results

    def ingest(self, paths: list[Path]) -> str:
        """Store ``paths`` with the tracker observing; the study UID."""
        self.ctx.ingestor.observers[:] = [self.tracker]
        (uid,) = {r.study_uid for r in self.store(paths)}
        return uid

    def arrival(self, study_uid: str) -> StudyArrival:
        with self.ctx.sessions() as session:
            row = session.get(StudyArrival, study_uid)
            assert row is not None
            return row

    def make_quiet(self, study_uid: str, seconds: float) -> None:
        """The study's last instance arrived ``seconds`` ago."""
        with self.ctx.sessions.begin() as session:
            session.execute(
                update(StudyArrival)
                .where(StudyArrival.study_uid == study_uid)
                .values(last_arrival=jobs.now() - timedelta(seconds=seconds))
            )

    @contextmanager
    def statements(self) -> Iterator[list[str]]:
        """The SQL statements sent to the database inside the block."""
        seen: list[str] = []

        def record(_conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
            seen.append(sql)

        event.listen(self.engine, "before_cursor_execute", record)
        try:
            yield seen
        finally:
            event.remove(self.engine, "before_cursor_execute", record)


@pytest.fixture
def gate(
    tmp_path: Path,
    database_url: str,
    engine: Engine,
    sessions: sessionmaker[Session],
    store: InstanceStore,
    tiny_study_files: list[Path],
) -> Gate:
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url)
    with sessions.begin() as session:
        ensure_default_policy(session, settings)
    ctx = JobContext(
        settings=settings, sessions=sessions, store=store, ingestor=Ingestor(store, sessions)
    )
    return Gate(ctx, engine, tiny_study_files)


def forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Calling any of these (module.attribute) fails the test."""

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("must not be called here")

    for name in names:
        monkeypatch.setattr(name, refuse)


# -- the observer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("auto", [False, True], ids=["no-auto-policy", "auto-policy"])
def test_observer_records_each_arrival_with_one_statement(
    gate: Gate, monkeypatch: pytest.MonkeyPatch, auto: bool
) -> None:
    """Before the acknowledgement: no policy, no model card, no file read; one upsert."""
    gate.mg_policy(cr=20, auto_classify=auto, expected_instances=1)
    stored = gate.store(gate.files)  # without the observer: it is called by hand below
    forbid(monkeypatch, "services.core.classify.JobContext.card", "pydicom.dcmread")
    forbid(monkeypatch, "services.core.arrivals.resolve_study_policy")
    with gate.statements() as seen:
        for result in stored:
            before = len(seen)
            gate.tracker(result, Channel.DIMSE)
            assert len(seen) - before <= 2, seen[before:]
    assert gate.sent == []
    row = gate.arrival(stored[0].study_uid)
    assert row.instance_count == len(stored) and row.settled_at is None


def test_observer_ignores_duplicates_and_the_workers_own_objects(gate: Gate) -> None:
    study_uid = gate.ingest(gate.files)
    gate.ingest(gate.files)  # the same bytes again: duplicates
    assert gate.arrival(study_uid).instance_count == len(gate.files)
    result = IngestResult("1.2", "1.2.3", study_uid, "1.2.4", Outcome.STORED, 1)
    gate.tracker(result, Channel.WORKER)
    assert gate.arrival(study_uid).instance_count == len(gate.files)


def test_parallel_arrivals_of_a_new_study_are_all_counted(
    sessions: sessionmaker[Session],
) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def arrive() -> None:
        try:
            barrier.wait()
            record_arrival(sessions, "1.2.3.4")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=arrive) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with sessions() as session:
        row = session.get(StudyArrival, "1.2.3.4")
        assert row is not None and row.instance_count == 8 and row.classified_count == 0
        assert row.settled_at is None


# -- housekeeping ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [
        {"cr": 20, "auto_classify": False, "expected_instances": 1},
        {"cr": 20, "auto_classify": True, "expected_instances": 1, "body_part": "CHEST"},
    ],
    ids=["no-auto-policy", "auto-policy-for-another-body-part"],
)
def test_a_study_no_policy_acts_on_is_settled_after_one_pass_and_not_looked_at_again(
    gate: Gate, monkeypatch: pytest.MonkeyPatch, policy: dict[str, Any]
) -> None:
    gate.mg_policy(**policy)
    study_uid = gate.ingest(gate.files)
    forbid(monkeypatch, "services.core.arrivals.resolve_study_policy", "pydicom.dcmread")
    assert gate.tracker.housekeeping() == []
    assert gate.arrival(study_uid).settled_at is not None
    with gate.statements() as seen:
        assert gate.tracker.housekeeping() == []
    assert not [s for s in seen if "series" in s or "policies" in s], seen
    assert gate.sent == []


def test_a_new_instance_unsettles_the_study(gate: Gate) -> None:
    study_uid = gate.ingest(gate.files[:3])
    gate.tracker.housekeeping()  # the default policy does not auto-classify
    assert gate.arrival(study_uid).settled_at is not None
    gate.mg_policy(cr=20, auto_classify=True, expected_instances=4)
    assert gate.tracker.housekeeping() == []  # settled: a new policy is seen with a new instance
    gate.ingest(gate.files[3:])
    row = gate.arrival(study_uid)
    assert row.settled_at is None and row.instance_count == 4
    (job_id,) = gate.tracker.housekeeping()
    assert gate.job_ids == [job_id]
    row = gate.arrival(study_uid)
    assert row.settled_at is not None and row.classified_count == 4


def test_expected_count_reached_makes_one_job_and_a_late_instance_a_new_one(gate: Gate) -> None:
    gate.mg_policy(cr=20, auto_classify=True, expected_instances=3, quiet_seconds=3600)
    study_uid = gate.ingest(gate.files[:2])
    assert gate.tracker.housekeeping() == []  # 2 of 3, quiet for an hour: waiting
    assert gate.arrival(study_uid).settled_at is None
    gate.ingest(gate.files[2:3])
    (first,) = gate.tracker.housekeeping()
    assert gate.tracker.housekeeping() == []  # settled
    gate.ingest(gate.files[3:])  # the late fourth view
    (second,) = gate.tracker.housekeeping()
    assert second != first and gate.job_ids == [first, second]
    with gate.ctx.sessions() as session:
        assert len(jobs.get_job(session, first).instance_uids or []) == 3
        assert len(jobs.get_job(session, second).instance_uids or []) == 4


def test_a_study_waiting_for_its_quiet_period_stays_unsettled_until_it_elapses(
    gate: Gate,
) -> None:
    gate.mg_policy(cr=15, auto_classify=True, expected_instances=None, quiet_seconds=60)
    study_uid = gate.ingest(gate.files)
    assert gate.tracker.housekeeping() == []
    assert gate.tracker.housekeeping() == []
    assert gate.arrival(study_uid).settled_at is None
    gate.make_quiet(study_uid, 61)
    (job_id,) = gate.tracker.housekeeping()
    assert gate.job_ids == [job_id]
    with gate.ctx.sessions() as session:
        job = jobs.get_job(session, job_id)
        assert job.cr == 15 and job.trigger == "arrival"
    assert gate.arrival(study_uid).settled_at is not None
    assert gate.tracker.housekeeping() == []


def test_an_instance_arriving_during_the_pass_keeps_the_study_unsettled(
    gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_uid = gate.ingest(gate.files[:3])
    read = arrivals.unsettled

    def read_then_arrive(sessions: sessionmaker[Session]) -> Any:
        found = read(sessions)
        record_arrival(sessions, study_uid)  # after the pass read the study's row
        return found

    monkeypatch.setattr(arrivals, "unsettled", read_then_arrive)
    gate.tracker.housekeeping()
    row = gate.arrival(study_uid)
    assert row.settled_at is None and row.instance_count == 4
    monkeypatch.setattr(arrivals, "unsettled", read)
    gate.tracker.housekeeping()
    assert gate.arrival(study_uid).settled_at is not None


def test_a_study_whose_job_cannot_be_made_is_settled(
    gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate.mg_policy(cr=20, auto_classify=True, expected_instances=4)
    study_uid = gate.ingest(gate.files)
    monkeypatch.setattr(gate.ctx.settings, "default_model", "no-such-model")
    assert gate.tracker.housekeeping() == []
    assert gate.arrival(study_uid).settled_at is not None and gate.sent == []


def test_housekeeping_sends_again_a_job_queued_too_long(gate: Gate) -> None:
    study_uid = gate.ingest(gate.files)  # the default policy: no auto job
    request, _ = prepare(
        gate.ctx, study_uid, cr=25, syntax=None, model=None, trigger=JobTrigger.API,
        requested_by=None,
    )  # fmt: skip
    job, _ = jobs.submit(gate.ctx.sessions, request)  # never sent
    gate.tracker.housekeeping()
    assert gate.sent == []
    stale = jobs.now() - timedelta(seconds=gate.ctx.settings.job_stale_seconds + 1)
    with gate.ctx.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job.id).values(queued_at=stale))
    gate.tracker.housekeeping()
    assert gate.job_ids == [job.id]


def test_migration_0005_settles_the_studies_already_classified(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config

    from services.core.db.engine import MIGRATIONS_DIR

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0004")
        connection.execute(
            text(
                "INSERT INTO study_arrivals (study_uid, instance_count, last_arrival, "
                "classified_count) VALUES ('1.1', 4, CURRENT_TIMESTAMP, 4), "
                "('1.2', 4, CURRENT_TIMESTAMP, 3)"
            )
        )
        command.upgrade(config, "head")
        settled = connection.execute(
            text("SELECT study_uid FROM study_arrivals WHERE settled_at IS NOT NULL")
        ).scalars()
        assert list(settled) == ["1.1"]
