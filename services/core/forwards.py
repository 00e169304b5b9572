"""Forwarding: each object to send to a destination is a row with a state, sent by a task of its
own (queue ``crgate.forward``), so that a PACS that is down or refuses never fails a result.

States: ``queued`` (recorded, its task handed to the queue), ``sending`` (a worker claimed it),
``sent`` (the peer answered success: the syntax that went out and the status are kept),
``retrying`` (a fault that may pass: connection refused or unreachable, association rejected or
aborted, status 0xA7xx out of resources; tried again after CRGATE_FORWARD_RETRY_SECONDS, doubled
at each attempt, at most an hour) and ``failed`` (the peer refused the object, 0xAxxx or 0xCxxx
with its Error Comment, or no syntax offered was accepted, or CRGATE_FORWARD_MAX_ATTEMPTS spent).
A failed row goes back to ``queued`` with :func:`resend` (audit-logged).

The housekeeping pass (:func:`housekeeping`) hands due rows to the queue again: retries survive
worker restarts, a task the broker refused is sent later, a row whose worker died while sending
is tried again. A task claims its rows before sending, so a task delivered twice sends once.

Sending itself (pynetdicom) is the runtime's: the job context holds a :class:`Forwarding` with
the sender, the queue and the destinations every result goes to (``CRGATE_FORWARD_TO``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from services.core import audit, destinations
from services.core.contracts import ForwardPayload, JobQueue
from services.core.db.tables import Destination, Forward, Instance
from services.core.errors import Conflict, CrgateError, InvalidParameter, NotFound
from services.core.telemetry import FORWARDED

if TYPE_CHECKING:
    from services.core.classify import JobContext

log = logging.getLogger(__name__)

ENTITY = "forward"
SHORTCUT_NAME = "forward-to"
"""The destination ``CRGATE_FORWARD_TO`` is kept as in the registry."""
BATCH = 200  # objects per task (one association)
MAX_BACKOFF_SECONDS = 3600.0
MAX_LIMIT = 1000
WHATS = ("original", "compressed", "result")


class ForwardState(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    RETRYING = "retrying"
    FAILED = "failed"


@dataclass(frozen=True)
class ForwardObject:
    """An object to forward: found by its UID in the index, or by ``path`` (relative to the
    store root) for a copy kept out of the study."""

    study_uid: str
    sop_instance_uid: str
    what: str = "result"
    job_id: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Outcome:
    """What became of one object on the association: ``retry`` is a fault that may pass."""

    state: Literal["sent", "retry", "failed"]
    syntax: str | None = None
    status: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class Delivery:
    """One association's outcome: per item key, or ``error`` when no association was made (then
    every item is to be retried)."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)  # transfer syntaxes the peer accepted
    error: str | None = None


Sender = Callable[[Peer, list[tuple[str, Path]]], Delivery]
"""C-STORE of ``(key, file)`` items to a peer on one association (the runtime's pynetdicom)."""


@dataclass
class Forwarding:
    """What a job context holds for forwarding."""

    send: Sender
    defaults: tuple[str, ...] = ()
    """Destinations every result goes to (``CRGATE_FORWARD_TO``)."""
    queue: JobQueue | None = None
    """Takes forward tasks; None: rows wait for the housekeeping pass."""


def is_retryable(status: int) -> bool:
    """0xA7xx (out of resources) may pass; other failures are the peer's refusal."""
    return status & 0xFF00 == 0xA700


def backoff(settings_base: float, attempts: int) -> float:
    """Seconds before attempt ``attempts + 1``: the base, doubled at each attempt, at most 1 h."""
    return float(min(settings_base * 2 ** max(attempts - 1, 0), MAX_BACKOFF_SECONDS))


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _object(
    item: ForwardObject | tuple[str, str], study_uid: str | None, job_id: str | None
) -> ForwardObject:
    if isinstance(item, ForwardObject):
        return item
    sop_uid, what = item
    if study_uid is None:
        raise InvalidParameter("an object given as (SOP Instance UID, what) needs its study UID")
    return ForwardObject(study_uid, sop_uid, what, job_id)


def request(
    sessions: sessionmaker[Session],
    queue: JobQueue | None,
    destination: str | int,
    objects: Sequence[ForwardObject],
    requested_by: str,
) -> list[Forward]:
    """Record ``objects`` as queued for ``destination`` (name, AE title or id) and hand one task
    per batch to the queue. A queue that does not take the task leaves the rows queued: the
    housekeeping pass hands them again. An object a job asked for already (a job run again) is
    not recorded twice: its row is returned. NotFound for an unknown destination."""
    bad = sorted({o.what for o in objects} - set(WHATS))
    if bad:
        raise InvalidParameter(f"what {bad[0]!r} is not one of {', '.join(WHATS)}")
    now = _now()
    with sessions() as session, session.begin():
        target = destinations.get_destination(session, destination)
        known = _known(session, target.id, {o.job_id for o in objects if o.job_id})
        again = [
            known[(o.job_id, o.sop_instance_uid)]
            for o in objects
            if (o.job_id, o.sop_instance_uid) in known
        ]
        objects = [o for o in objects if (o.job_id, o.sop_instance_uid) not in known]
        rows = [
            Forward(
                id=str(uuid.uuid4()),
                destination_id=target.id,
                destination=target.name,
                study_uid=o.study_uid,
                sop_instance_uid=o.sop_instance_uid,
                what=o.what,
                job_id=o.job_id,
                path=o.path,
                state=ForwardState.QUEUED.value,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
                requested_by=requested_by[:128],
            )
            for o in objects
        ]
        session.add_all(rows)
    _hand(queue, [r.id for r in rows])
    return again + rows


def _known(
    session: Session, destination_id: int, job_ids: set[str | None]
) -> dict[tuple[str | None, str], Forward]:
    """The rows the jobs ``job_ids`` recorded for the destination, by (job, SOP Instance UID)."""
    if not job_ids:
        return {}
    rows = session.scalars(
        select(Forward).where(Forward.destination_id == destination_id, Forward.job_id.in_(job_ids))
    )
    return {(r.job_id, r.sop_instance_uid): r for r in rows}


def _hand(queue: JobQueue | None, ids: list[str]) -> int:
    """Send tasks for ``ids`` (of one destination), in batches; how many batches were taken."""
    if queue is None:
        return 0
    taken = 0
    for start in range(0, len(ids), BATCH):
        try:
            queue.enqueue(ForwardPayload(forward_ids=ids[start : start + BATCH]))
            taken += 1
        except Exception as exc:  # the broker away: housekeeping hands them later
            log.warning("forward task not queued (%s); housekeeping sends it", type(exc).__name__)
    return taken


def forward_result(
    ctx: JobContext,
    job_id: str | None,
    study_uid: str,
    objects: Sequence[ForwardObject | tuple[str, str]],
    destinations: Sequence[str] | None = None,
    *,
    requested_by: str = "system",
) -> dict[str, Any] | None:
    """Forward a job's objects (``(sop_instance_uid, what)`` pairs or :class:`ForwardObject`;
    ``what``: original, compressed or result) to ``destinations`` by name, AE title or id (None:
    the context's defaults, ``CRGATE_FORWARD_TO``); ``job_id`` None for objects no job made
    (originals under a forward-only policy).

    Never raises: the rows are recorded and their tasks handed to the forward queue; what was
    asked is returned for the result's ``outputs.forwarded`` (None when nothing was asked).
    """
    forwarding = ctx.forward
    names = list(
        dict.fromkeys(
            destinations
            if destinations is not None
            else (forwarding.defaults if forwarding is not None else ())
        )
    )
    if not names or not objects:
        return None
    asked: list[dict[str, Any]] = []
    for name in names:
        entry: dict[str, Any] = {"destination": name, "objects": len(objects)}
        try:
            items = [_object(o, study_uid, job_id) for o in objects]
            rows = request(
                ctx.sessions,
                forwarding.queue if forwarding is not None else None,
                name,
                items,
                requested_by,
            )
            entry["forward_ids"] = [r.id for r in rows]
        except CrgateError as exc:
            entry["error"] = str(exc)
        except Exception as exc:  # forwarding never fails a stored result
            log.warning(
                "job %s: forwarding to %s not recorded: %s", job_id, name, type(exc).__name__
            )
            entry["error"] = f"forwarding not recorded ({type(exc).__name__})"
        asked.append(entry)
    return {"destinations": asked}


def claim(sessions: sessionmaker[Session], forward_ids: Iterable[str]) -> list[Forward]:
    """Take the rows among ``forward_ids`` that are queued, or retrying and due: ``sending``.
    Rows another task took already (or sent) are left out: a task delivered twice sends once."""
    ids = list(forward_ids)
    now = _now()
    with sessions() as session, session.begin():
        claimed = session.scalars(
            update(Forward)
            .where(
                Forward.id.in_(ids),
                Forward.state.in_([ForwardState.QUEUED.value, ForwardState.RETRYING.value]),
                Forward.next_attempt_at <= now,
            )
            .values(state=ForwardState.SENDING.value, updated_at=now)
            .returning(Forward.id)
        ).all()
        if not claimed:
            return []
        return list(session.scalars(select(Forward).where(Forward.id.in_(claimed))))


def run(ctx: JobContext, forward_ids: Sequence[str]) -> dict[str, int]:
    """The forward task: claim the rows, send them (one association per destination) and
    record each one's state. Returns how many rows ended in each state."""
    rows = claim(ctx.sessions, forward_ids)
    counts: dict[str, int] = {}
    by_destination: dict[int | None, list[Forward]] = {}
    for row in rows:
        by_destination.setdefault(row.destination_id, []).append(row)
    for destination_id, group in by_destination.items():
        for state, n in _send_group(ctx, destination_id, group).items():
            counts[state] = counts.get(state, 0) + n
    return counts


def _send_group(ctx: JobContext, destination_id: int | None, rows: list[Forward]) -> dict[str, int]:
    outcomes: dict[str, Outcome] = {}
    with ctx.sessions() as session:
        target = session.get(Destination, destination_id) if destination_id is not None else None
        peer = Peer(target.ae_title, target.host, target.port) if target is not None else None
        items: list[tuple[str, Path]] = []
        for row in rows:
            path = _path(ctx, session, row)
            if peer is None:
                outcomes[row.id] = Outcome("failed", error="the destination was deleted")
            elif path is None:
                outcomes[row.id] = Outcome("failed", error="the object is no longer stored")
            else:
                items.append((row.id, path))
    if peer is not None and items:
        if ctx.forward is None:
            delivery = Delivery(error="forwarding is not set up in this process")
        else:
            try:
                delivery = ctx.forward.send(peer, items)
            except Exception as exc:  # a fault of the sender: tried again later
                log.warning("forwarding to %s: %s", peer, type(exc).__name__)
                delivery = Delivery(error=f"sending failed ({type(exc).__name__})")
        for key, _ in items:
            outcomes[key] = (
                Outcome("retry", error=delivery.error)
                if delivery.error is not None
                else delivery.outcomes.get(key, Outcome("retry", error="no answer for the object"))
            )
        if delivery.accepted and destination_id is not None:
            with ctx.sessions() as session, session.begin():
                target = session.get(Destination, destination_id)
                if target is not None:
                    destinations.record_detected(session, target, delivery.accepted)
    return _record(ctx, rows, outcomes)


def _path(ctx: JobContext, session: Session, row: Forward) -> Path | None:
    if row.path is not None:
        path = ctx.store.root / row.path
        return path if path.is_file() else None
    relative = session.scalar(
        select(Instance.path).where(Instance.sop_instance_uid == row.sop_instance_uid)
    )
    if relative is None:
        return None
    path = ctx.store.absolute(relative)
    return path if path.is_file() else None


def _record(ctx: JobContext, rows: list[Forward], outcomes: dict[str, Outcome]) -> dict[str, int]:
    settings = ctx.settings
    now = _now()
    counts: dict[str, int] = {}
    with ctx.sessions() as session, session.begin():
        for row in rows:
            outcome = outcomes[row.id]
            attempts = row.attempts + 1
            values: dict[str, Any] = {
                "attempts": attempts,
                "updated_at": now,
                "status": None if outcome.status is None else f"0x{outcome.status:04X}",
                "error": None if outcome.error is None else outcome.error[:500],
            }
            if outcome.syntax is not None:
                values["syntax"] = outcome.syntax
            if outcome.state == "sent":
                state = ForwardState.SENT
            elif outcome.state == "retry" and attempts < settings.forward_max_attempts:
                state = ForwardState.RETRYING
                delay = backoff(settings.forward_retry_seconds, attempts)
                values["next_attempt_at"] = now + timedelta(seconds=delay)
            else:
                state = ForwardState.FAILED
                if outcome.state == "retry":
                    values["error"] = f"gave up after {attempts} attempts: {outcome.error}"[:500]
            values["state"] = state.value
            session.execute(
                update(Forward)
                .where(Forward.id == row.id, Forward.state == ForwardState.SENDING.value)
                .values(**values)
            )
            counts[state.value] = counts.get(state.value, 0) + 1
            FORWARDED.labels(state.value).inc()
    return counts


def housekeeping(ctx: JobContext, queue: JobQueue | None) -> list[str]:
    """Hand the due rows to the queue again: retries whose time came, rows queued for longer
    than CRGATE_FORWARD_RETRY_SECONDS (their task lost or refused by the broker) and rows left
    ``sending`` by a worker that died (counted as an attempt). Returns the ids handed."""
    settings = ctx.settings
    now = _now()
    grace = timedelta(seconds=settings.forward_retry_seconds)
    stale = now - max(grace, timedelta(seconds=settings.job_time_limit))
    waiting = [ForwardState.QUEUED.value, ForwardState.RETRYING.value]
    with ctx.sessions() as session, session.begin():
        session.execute(
            update(Forward)
            .where(Forward.state == ForwardState.SENDING.value, Forward.updated_at <= stale)
            .values(
                state=ForwardState.RETRYING.value,
                attempts=Forward.attempts + 1,
                next_attempt_at=now,
                updated_at=now - grace,
                error="the worker sending it stopped",
            )
        )
        session.execute(
            update(Forward)
            .where(
                Forward.state == ForwardState.RETRYING.value,
                Forward.attempts >= settings.forward_max_attempts,
            )
            .values(state=ForwardState.FAILED.value, updated_at=now)
        )
        due = session.execute(
            select(Forward.id, Forward.destination_id)
            .where(
                Forward.state.in_(waiting),
                Forward.next_attempt_at <= now,
                Forward.updated_at <= now - grace,
            )
            .order_by(Forward.next_attempt_at)
            .limit(BATCH * 20)
        ).all()
        if due:
            session.execute(
                update(Forward)
                .where(Forward.id.in_([d.id for d in due]), Forward.state.in_(waiting))
                .values(updated_at=now)
            )
    groups: dict[int | None, list[str]] = {}
    for forward_id, destination_id in due:
        groups.setdefault(destination_id, []).append(forward_id)
    handed: list[str] = []
    for ids in groups.values():
        if queue is None:
            run(ctx, ids)
        else:
            _hand(queue, ids)
        handed += ids
    return handed


def resend(
    sessions: sessionmaker[Session],
    queue: JobQueue | None,
    *,
    actor: str,
    forward_id: str | None = None,
    state: str = ForwardState.FAILED.value,
    destination: str | None = None,
) -> list[str]:
    """Put failed rows back to ``queued`` (attempts from zero) and hand them to the queue: one
    row by id (Conflict unless it failed), or every row in ``state`` (failed) of a
    ``destination`` (or of all). Audit-logged. Returns the ids queued."""
    now = _now()
    with sessions() as session, session.begin():
        if forward_id is not None:
            row = get_forward(session, forward_id)
            if row.state != ForwardState.FAILED.value:
                raise Conflict(f"forward {forward_id} is {row.state}: only a failed one is re-sent")
            rows = [row]
        else:
            if state != ForwardState.FAILED.value:
                raise InvalidParameter(f"state {state[:20]!r}: only failed forwards are re-sent")
            query = select(Forward).where(Forward.state == ForwardState.FAILED.value)
            if destination:
                query = query.where(Forward.destination == _destination_name(session, destination))
            rows = list(session.scalars(query.order_by(Forward.created_at).limit(10 * MAX_LIMIT)))
        ids = [r.id for r in rows]
        before = [
            {"id": r.id, "state": r.state, "status": r.status, "error": r.error} for r in rows
        ]
        for row in rows:
            row.state = ForwardState.QUEUED.value
            row.attempts = 0
            row.status = row.error = None
            row.next_attempt_at = row.updated_at = now
        if rows:
            audit.record(
                session,
                actor=actor,
                action="resend",
                entity=ENTITY,
                entity_id=forward_id,
                before={"forwards": before[:100], "count": len(before)},
                after={"state": ForwardState.QUEUED.value, "count": len(ids)},
                reason=None
                if forward_id
                else f"all failed of {destination or 'every destination'}",
            )
        by_destination: dict[int | None, list[str]] = {}
        for row in rows:
            by_destination.setdefault(row.destination_id, []).append(row.id)
    for group in by_destination.values():
        _hand(queue, group)
    return ids


def _destination_name(session: Session, key: str) -> str:
    """A registry destination's name, or the name kept on rows of a deleted one."""
    try:
        return destinations.get_destination(session, key).name
    except NotFound:
        if session.scalar(select(Forward.id).where(Forward.destination == key).limit(1)):
            return key
        raise


def state_of(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if value not in {s.value for s in ForwardState}:
        raise InvalidParameter(
            f"state {value[:20]!r} is not one of {', '.join(s.value for s in ForwardState)}"
        )
    return value


def list_forwards(
    session: Session,
    *,
    state: str | None = None,
    destination: str | None = None,
    study_uid: str | None = None,
    job_id: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Forward], int]:
    """A page of rows, newest first, and how many match in all."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidParameter(f"limit {limit} is out of range: use 1 to {MAX_LIMIT}")
    if offset < 0:
        raise InvalidParameter(f"offset {offset} is negative")
    conditions = []
    if (checked := state_of(state)) is not None:
        conditions.append(Forward.state == checked)
    if destination:
        conditions.append(Forward.destination == _destination_name(session, destination))
    if study_uid:
        conditions.append(Forward.study_uid == study_uid)
    if job_id:
        conditions.append(Forward.job_id == job_id)
    query = select(Forward).where(*conditions)
    total = session.scalar(select(func.count()).select_from(Forward).where(*conditions)) or 0
    rows = session.scalars(
        query.order_by(Forward.created_at.desc(), Forward.id).limit(limit).offset(offset)
    )
    return list(rows), int(total)


def get_forward(session: Session, forward_id: str) -> Forward:
    row = session.get(Forward, forward_id[:36])
    if row is None:
        raise NotFound(f"no forward {forward_id[:40]!r} (see GET /forwards)")
    return row


def snapshot(row: Forward) -> dict[str, Any]:
    """A row as the API and the CLI show it."""
    return {
        "id": row.id,
        "destination": row.destination,
        "destination_id": row.destination_id,
        "study_uid": row.study_uid,
        "sop_instance_uid": row.sop_instance_uid,
        "what": row.what,
        "job_id": row.job_id,
        "state": row.state,
        "attempts": row.attempts,
        "syntax": row.syntax,
        "status": row.status,
        "error": row.error,
        "next_attempt_at": _utc(row.next_attempt_at).isoformat()
        if row.state in (ForwardState.QUEUED.value, ForwardState.RETRYING.value)
        else None,
        "created_at": _utc(row.created_at).isoformat(),
        "updated_at": _utc(row.updated_at).isoformat(),
        "requested_by": row.requested_by,
    }


def job_states(session: Session, job_id: str) -> dict[str, Any] | None:
    """The current states of a job's forwards (for its result): counts per destination and
    state, and the failed objects with the peer's status and error. None when there are none."""
    counts = session.execute(
        select(Forward.destination, Forward.state, func.count())
        .where(Forward.job_id == job_id)
        .group_by(Forward.destination, Forward.state)
    ).all()
    if not counts:
        return None
    per: dict[str, dict[str, int]] = {}
    for name, state, n in counts:
        per.setdefault(name, {s.value: 0 for s in ForwardState})[state] = int(n)
    failed = session.scalars(
        select(Forward)
        .where(Forward.job_id == job_id, Forward.state == ForwardState.FAILED.value)
        .order_by(Forward.created_at)
        .limit(100)
    )
    return {
        "destinations": [{"destination": name, **states} for name, states in sorted(per.items())],
        "failed": [
            {
                "id": r.id,
                "destination": r.destination,
                "sop_instance_uid": r.sop_instance_uid,
                "what": r.what,
                "status": r.status,
                "error": r.error,
            }
            for r in failed
        ],
    }


def ensure_destination(
    sessions: sessionmaker[Session],
    ae_title: str,
    host: str,
    port: int,
    *,
    name: str = SHORTCUT_NAME,
) -> str:
    """Keep ``CRGATE_FORWARD_TO`` in the registry as destination ``name`` (created, or changed
    to the setting's values; audit-logged as the system's). Returns the name results go to."""
    with sessions() as session, session.begin():
        try:
            row = destinations.get_destination(session, name)
        except NotFound:
            row = None
        if row is None:
            same = session.scalars(
                select(Destination).where(Destination.ae_title == ae_title.strip())
            ).first()
            if same is not None and (same.host, same.port) == (host, port):
                return same.name  # registered by hand already
            spec = destinations.DestinationSpec(name, ae_title, host, port)
            return destinations.create_destination(session, spec, actor="system").name
        if (row.ae_title, row.host, row.port) != (ae_title.strip(), host, port):
            changes: destinations.DestinationChanges = {
                "ae_title": ae_title,
                "host": host,
                "port": port,
            }
            destinations.update_destination(session, row.id, changes, actor="system")
        return row.name


def with_states(session: Session, payload: Any, job_id: str) -> Any:
    """A result's payload with its forwards' current states (``outputs.forwarded.states``), read
    from the forwards table now; the stored payload holds what was asked."""
    outputs = payload.get("outputs") if isinstance(payload, dict) else None
    if not isinstance(outputs, dict) or not isinstance(outputs.get("forwarded"), dict):
        return payload
    states = job_states(session, job_id)
    forwarded = {**outputs["forwarded"], "states": states}
    return {**payload, "outputs": {**outputs, "forwarded": forwarded}}
