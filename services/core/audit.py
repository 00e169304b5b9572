"""The audit log: who changed what, when, from what to what, and why (newest first on read)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.core.db.tables import AuditEntry
from services.core.errors import InvalidParameter

MAX_LIMIT = 1000
ENTITIES = (
    "destination",
    "forward",
    "instance",
    "job",
    "key",
    "policy",
    "result",
    "series",
    "study",
)
"""What the log records: CR policies, API keys, destinations, forwards (re-sends), jobs
(overrides of a ceiling), deletions of studies, series, instances and results (by a person or
by retention)."""


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    entity: str,
    entity_id: str | int | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    reason: str | None = None,
) -> AuditEntry:
    """Add one entry to the caller's transaction (it commits or rolls back with the change)."""
    entry = AuditEntry(
        at=datetime.now(UTC),
        actor=(actor.strip() or "unknown")[:128],
        action=action[:32],
        entity=entity[:32],
        entity_id=None if entity_id is None else str(entity_id)[:64],
        before=before,
        after=after,
        reason=reason,
    )
    session.add(entry)
    session.flush()
    return entry


def entries(
    session: Session,
    *,
    entity: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[AuditEntry], int]:
    """A page of entries, newest first, and how many there are in all (for that entity, from
    ``since`` on). An entity the log does not record is refused, naming those it does."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidParameter(f"limit {limit} is out of range: use 1 to {MAX_LIMIT}")
    if offset < 0:
        raise InvalidParameter(f"offset {offset} is negative")
    if entity and entity not in ENTITIES:
        raise InvalidParameter(
            f"entity {entity[:40]!r} is not recorded in the audit log: use one of "
            f"{', '.join(ENTITIES)}"
        )
    query = select(AuditEntry)
    count = select(func.count()).select_from(AuditEntry)
    if entity:
        query = query.where(AuditEntry.entity == entity)
        count = count.where(AuditEntry.entity == entity)
    if since is not None:
        since = since if since.tzinfo else since.replace(tzinfo=UTC)
        query = query.where(AuditEntry.at >= since)
        count = count.where(AuditEntry.at >= since)
    rows = session.scalars(query.order_by(AuditEntry.id.desc()).limit(limit).offset(offset))
    return list(rows), int(session.scalar(count) or 0)
