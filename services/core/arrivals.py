"""Study arrival: when is a study ready, and the policies' actions on ready studies.

Instances are grouped by Study Instance UID. The ingest observer (``ArrivalTracker.__call__``,
before the acknowledgement) only records the arrival: one upsert of the study's row (instances so
far, last arrival) that also clears its settled mark. It reads no policy, model card or file.

Housekeeping (``ArrivalTracker.housekeeping``, every CRGATE_ARRIVAL_SWEEP_SECONDS) decides, for
unsettled studies only: is there a policy that acts on some of the study's images (classify,
compress or forward; matched by each series' modality and body part and the patient's age), and
is the study ready: each such policy's expected instance count reached, or its quiet period over
with no new instance. A ready study becomes jobs at the policies' CRs: a classification of its
mammograms, a compression per policy that compresses. A study no policy acts on, or whose jobs
were made, is settled: housekeeping
does not look at it again until a new instance arrives; a study still waiting stays unsettled.
A late instance changes the study's instance set, hence the job's idempotency key: it makes a new
job and a new result, never a changed old one. Housekeeping also sends again jobs whose worker
died or whose message was lost. (A study can always be classified on request: POST classify.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

from sqlalchemy import Table, bindparam, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from services.core import classify, compress, jobs
from services.core.classify import JobContext, resolve_study_policy
from services.core.contracts import ClassifyPayload, JobQueue, JobTrigger, SweepPayload
from services.core.db.repository import insert_or_update
from services.core.db.tables import Forward, Policy, Series, StudyArrival
from services.core.errors import CrgateError
from services.core.forwards import ForwardObject, forward_result
from services.core.ingest import Channel, IngestResult, Outcome
from services.core.policies import ANY, CLASSIFIABLE_MODALITY, ResolvedPolicy

log = logging.getLogger(__name__)

_IN_CHUNK = 500  # study UIDs per IN (...) list
_ARRIVALS = cast(Table, StudyArrival.__table__)


@dataclass(frozen=True)
class Arrival:
    """An unsettled study as housekeeping read it."""

    study_uid: str
    count: int  # instances so far
    classified: int  # instances at the last auto job
    last: datetime  # the last arrival (UTC)


def record_arrival(sessions: sessionmaker[Session], study_uid: str) -> None:
    """Count one more instance of the study and unsettle it: one upsert, safe when instances of
    the study arrive in parallel (several associations or STOW requests)."""
    now = datetime.now(UTC)
    with sessions() as session, session.begin():
        insert_or_update(
            session,
            _ARRIVALS,
            {
                "study_uid": study_uid,
                "instance_count": 1,
                "classified_count": 0,
                "last_arrival": now,
                "settled_at": None,
            },
            key=["study_uid"],
            changes={
                "instance_count": _ARRIVALS.c.instance_count + 1,
                "last_arrival": now,
                "settled_at": None,
            },
        )


def unsettled(sessions: sessionmaker[Session]) -> list[Arrival]:
    """The studies housekeeping has to look at (an indexed read: settled ones cost nothing)."""
    with sessions() as session:
        rows = session.execute(
            select(
                StudyArrival.study_uid,
                StudyArrival.instance_count,
                StudyArrival.classified_count,
                StudyArrival.last_arrival,
            ).where(StudyArrival.settled_at.is_(None))
        ).all()
    return [
        Arrival(uid, count, classified, last if last.tzinfo else last.replace(tzinfo=UTC))
        for uid, count, classified, last in rows
    ]


def settle(sessions: sessionmaker[Session], arrivals: Iterable[Arrival]) -> None:
    """Mark the studies settled, each only if no instance arrived since it was read."""
    params = [{"uid": a.study_uid, "count": a.count} for a in arrivals]
    if not params:
        return
    statement = (
        update(_ARRIVALS)
        .where(
            _ARRIVALS.c.study_uid == bindparam("uid"),
            _ARRIVALS.c.instance_count == bindparam("count"),
        )
        .values(settled_at=datetime.now(UTC))
    )
    with sessions() as session, session.begin():
        session.execute(statement, params)


def _mark_classified(sessions: sessionmaker[Session], arrival: Arrival) -> None:
    with sessions() as session, session.begin():
        session.execute(
            update(StudyArrival)
            .where(
                StudyArrival.study_uid == arrival.study_uid,
                StudyArrival.classified_count < arrival.count,
            )
            .values(classified_count=arrival.count)
        )


def _acting_policies(session: Session) -> list[Policy]:
    """The policies that do something by themselves: classify, compress or forward."""
    query = select(Policy).where(
        or_(
            Policy.auto_classify.is_(True),
            Policy.auto_compress.is_(True),
            Policy.forward_to.is_not(None),
        )
    )
    return [p for p in session.scalars(query) if p.auto_classify or p.auto_compress or p.forward_to]


def _series_keys(session: Session, study_uids: list[str]) -> dict[str, set[tuple[str, str]]]:
    """Each study's (modality, body part) pairs of its series (studies without one left out)."""
    keys: dict[str, set[tuple[str, str]]] = {}
    for start in range(0, len(study_uids), _IN_CHUNK):
        rows = session.execute(
            select(Series.study_uid, Series.modality, Series.body_part_examined).where(
                Series.study_uid.in_(study_uids[start : start + _IN_CHUNK])
            )
        )
        for uid, modality, part in rows:
            pair = ((modality or "").strip().upper(), (part or "").strip().upper())
            keys.setdefault(uid, set()).add(pair)
    return keys


def _could_act(policies: list[Policy], series: set[tuple[str, str]] | None) -> bool:
    """Whether one of the acting policies could be one of the study's series' (the pediatric
    part is left to the full resolution: it reads a header)."""
    if not series:
        return False
    return any(
        (p.modality == ANY or p.modality == modality) and p.body_part in (ANY, part)
        for p in policies
        for modality, part in series
    )


class ArrivalTracker:
    """Records arrivals (as an ingest observer) and makes jobs of ready studies (housekeeping)."""

    def __init__(self, ctx: JobContext, queue: JobQueue) -> None:
        self.ctx = ctx
        self.queue = queue

    def __call__(self, result: IngestResult, channel: Channel) -> None:
        if channel is Channel.WORKER or result.outcome in (Outcome.DUPLICATE, Outcome.KEPT):
            return
        record_arrival(self.ctx.sessions, result.study_uid)

    def housekeeping(self) -> list[str]:
        """One periodic pass: send again jobs whose worker died and jobs queued too long (their
        message was lost, or sending it failed); make jobs of ready unsettled studies, settle
        the studies nothing is left to do for. Returns the ids of the jobs of ready studies."""
        self._send_again()
        waiting = unsettled(self.ctx.sessions)
        if not waiting:
            return []
        with self.ctx.sessions() as session:
            auto = _acting_policies(session)
            parts = _series_keys(session, [a.study_uid for a in waiting]) if auto else {}
        started: list[str] = []
        done: list[Arrival] = []
        try:
            for arrival in waiting:
                if arrival.count > arrival.classified and _could_act(
                    auto, parts.get(arrival.study_uid)
                ):
                    made, handled = self._consider(arrival)
                    if made is not None:
                        started.append(made)
                    if not handled:
                        continue  # waiting for more instances or for its quiet period
                done.append(arrival)
        finally:
            settle(self.ctx.sessions, done)
        return started

    def _consider(self, arrival: Arrival) -> tuple[str | None, bool]:
        """(a job made, whether the study is handled) for a study an acting policy may act on.

        The study is ready when every policy that acts on some of its images is: its expected
        instance count reached, or its quiet period over. Then each acts: classify (the
        mammograms), compress (the images under policies that compress), forward (with the
        outputs of those jobs; originals under forward-only policies right away).
        """
        acting = [g for g in self._groups(arrival.study_uid) if g.policy.acts]
        if not acting:
            return None, True
        now = datetime.now(UTC)
        for group in acting:
            expected = group.policy.expected_instances
            ready = expected is not None and arrival.count >= expected
            quiet = now - arrival.last >= timedelta(seconds=group.policy.quiet_seconds)
            if not (ready or quiet):
                return None, False
        made: list[str] = []
        acts = (
            ("classified", self._classify),
            ("compressed", self._compress),
            ("forwarded", self._forward_originals),
        )
        for what, act in acts:
            try:
                made += act(arrival.study_uid, acting)
            except CrgateError as exc:  # its images went, the model is not installed...
                log.warning("study %s not %s: %s", arrival.study_uid, what, exc)
        _mark_classified(self.ctx.sessions, arrival)
        log.info("study %s ready (%d instances): jobs %s", arrival.study_uid, arrival.count, made)
        return (made[0] if made else None), True

    def _groups(self, study_uid: str) -> list[compress.PolicyGroup]:
        with self.ctx.sessions() as session:
            try:
                instances = compress.compressible_instances(session, study_uid)
                return compress.policy_groups(session, self.ctx, instances)
            except CrgateError:
                return []

    def _classify(self, study_uid: str, acting: list[compress.PolicyGroup]) -> list[str]:
        """The study's classification at its policy's CR, when that policy classifies (a job
        that exists already for the same instance set and parameters is not sent again)."""
        with self.ctx.sessions() as session:
            if not classify.classifiable_instances(session, study_uid):
                return []  # no mammogram: nothing a model reads
        policy = self._policy(study_uid)
        if policy is None or not policy.auto_classify:
            return []
        job, _created = classify.request(
            self.ctx,
            self.queue,
            study_uid,
            cr=None,
            syntax=None,
            model=None,
            trigger=JobTrigger.ARRIVAL,
            requested_by="arrival",
        )
        return [job.id]

    def _compress(self, study_uid: str, acting: list[compress.PolicyGroup]) -> list[str]:
        """One compress job per policy that compresses some of the study's images."""
        ids = {g.policy.policy_id for g in acting if g.policy.auto_compress}
        if not ids:
            return []
        made = compress.request(
            self.ctx,
            self.queue,
            study_uid,
            cr=None,
            syntax=None,
            trigger=JobTrigger.ARRIVAL,
            requested_by="arrival",
            policy_ids=ids,
        )
        return [job.id for job, _created in made]

    def _forward_originals(self, study_uid: str, acting: list[compress.PolicyGroup]) -> list[str]:
        """Policies that forward without compressing or classifying send the originals of their
        images, each once per destination (a late instance goes on its own). Makes no job."""
        for group in acting:
            if not group.policy.forwards_only:
                continue
            for destination in group.policy.forward_to or []:
                with self.ctx.sessions() as session:
                    sent = set(
                        session.scalars(
                            select(Forward.sop_instance_uid).where(
                                Forward.study_uid == study_uid,
                                Forward.destination == destination,
                                Forward.what == "original",
                            )
                        )
                    )
                objects = [
                    ForwardObject(study_uid, i.sop_instance_uid, "original", None)
                    for i in group.instances
                    if i.sop_instance_uid not in sent
                ]
                forward_result(
                    self.ctx, None, study_uid, objects, [destination], requested_by="arrival"
                )
        return []

    def _send_again(self) -> None:
        """Jobs and sweeps whose worker died, and those queued too long (their message was
        lost, or sending it failed), go to the queue again."""
        older_than_s = self.ctx.settings.job_stale_seconds
        for job_id in jobs.JOBS.stale(self.ctx.sessions, older_than_s=older_than_s):
            log.warning("job %s: worker stopped responding or message lost; sent again", job_id)
            jobs.hand_over(self.queue, ClassifyPayload(job_id=job_id), f"job {job_id}")
        for sweep_id in jobs.SWEEPS.stale(self.ctx.sessions, older_than_s=older_than_s):
            log.warning("sweep %s: worker stopped responding or message lost; sent again", sweep_id)
            jobs.hand_over(self.queue, SweepPayload(sweep_id=sweep_id), f"sweep {sweep_id}")

    def _policy(self, study_uid: str) -> ResolvedPolicy | None:
        with self.ctx.sessions() as session:
            try:
                policy: ResolvedPolicy = resolve_study_policy(session, study_uid, self.ctx.store)
            except CrgateError:
                return None
            return policy


__all__ = ["CLASSIFIABLE_MODALITY", "ArrivalTracker", "record_arrival"]
