"""Destinations: the PACS crgate sends to, by name and AE title; every change audit-logged.

A destination's accepted transfer syntaxes are either given by the admin or left out, in which
case the first association with it (an echo or a forward) records what it accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.core import audit
from services.core.db.tables import Destination
from services.core.errors import Conflict, InvalidParameter, NotFound

ENTITY = "destination"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")
_HOST = re.compile(r"^[A-Za-z0-9.:-]{1,255}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class DestinationSpec:
    """A new destination; ``syntaxes`` None means: detect at the first association."""

    name: str
    ae_title: str
    host: str
    port: int
    syntaxes: list[str] | None = None


class DestinationChanges(TypedDict, total=False):
    name: str
    ae_title: str
    host: str
    port: int
    syntaxes: list[str] | None


def ae_title(value: str) -> str:
    """An AE title as PS3.5 allows it: 1 to 16 characters, no backslash or control
    characters, not only spaces (leading and trailing spaces are not significant)."""
    text = value.strip()
    if not 1 <= len(text) <= 16 or "\\" in text or any(ord(c) < 32 or ord(c) > 126 for c in text):
        raise InvalidParameter(
            f"AE title {value[:40]!r} is not valid: 1 to 16 printable ASCII characters, no "
            "backslash"
        )
    return text


def _name(value: str) -> str:
    text = value.strip()
    if not _NAME.match(text):
        raise InvalidParameter(
            f"name {value[:40]!r}: use 1 to 64 letters, digits, spaces, dots, dashes or "
            "underscores, starting with a letter or digit"
        )
    return text


def _host(value: str) -> str:
    text = value.strip()
    if not _HOST.match(text):
        raise InvalidParameter(f"host {value[:40]!r} is not a host name or IP address")
    return text


def _port(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise InvalidParameter(f"port {value!r} is out of range: use 1 to 65535")
    return value


def _syntaxes(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    cleaned = [str(v).strip() for v in value]
    bad = [v for v in cleaned if not (_UID.match(v) and len(v) <= 64)]
    if bad or not cleaned:
        raise InvalidParameter(
            f"transfer syntaxes must be UIDs like 1.2.840.10008.1.2.1, got {bad[:1] or value}"
        )
    return sorted(set(cleaned))


def snapshot(row: Destination) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "ae_title": row.ae_title,
        "host": row.host,
        "port": row.port,
        "syntaxes": row.syntaxes,
    }


def list_destinations(session: Session) -> list[Destination]:
    return list(session.scalars(select(Destination).order_by(Destination.id)))


def get_destination(session: Session, key: int | str) -> Destination:
    """By id, name or AE title."""
    row = session.get(Destination, key) if isinstance(key, int) else None
    if row is None and isinstance(key, str):
        row = session.scalars(
            select(Destination).where(
                (Destination.name == key.strip()) | (Destination.ae_title == key.strip())
            )
        ).first()
        if row is None and key.isascii() and key.isdigit() and len(key) < 10:
            row = session.get(Destination, int(key))
    if row is None:
        raise NotFound(f"no destination {str(key)[:64]!r} (see GET /destinations)")
    return row


def _flush(session: Session, what: str) -> None:
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        raise Conflict(
            f"a destination with that name or AE title exists already ({what})"
        ) from None


def create_destination(session: Session, spec: DestinationSpec, *, actor: str) -> Destination:
    now = datetime.now(UTC)
    row = Destination(
        name=_name(spec.name),
        ae_title=ae_title(spec.ae_title),
        host=_host(spec.host),
        port=_port(spec.port),
        syntaxes=_syntaxes(spec.syntaxes),
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    _flush(session, f"{row.name}, {row.ae_title}")
    audit.record(
        session,
        actor=actor,
        action="create",
        entity=ENTITY,
        entity_id=row.id,
        before=None,
        after=snapshot(row),
    )
    return row


def update_destination(
    session: Session, key: int | str, changes: DestinationChanges, *, actor: str
) -> Destination:
    row = get_destination(session, key)
    before = snapshot(row)
    if "name" in changes:
        row.name = _name(changes["name"])
    if "ae_title" in changes:
        row.ae_title = ae_title(changes["ae_title"])
    if "host" in changes:
        row.host = _host(changes["host"])
    if "port" in changes:
        row.port = _port(changes["port"])
    if "syntaxes" in changes:
        row.syntaxes = _syntaxes(changes["syntaxes"])
    if snapshot(row) != before:
        row.updated_at = datetime.now(UTC)
        _flush(session, f"{row.name}, {row.ae_title}")
        audit.record(
            session,
            actor=actor,
            action="update",
            entity=ENTITY,
            entity_id=row.id,
            before=before,
            after=snapshot(row),
        )
    return row


def delete_destination(session: Session, key: int | str, *, actor: str) -> None:
    row = get_destination(session, key)
    before = snapshot(row)
    session.delete(row)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="delete",
        entity=ENTITY,
        entity_id=before["id"],
        before=before,
        after=None,
    )


def record_detected(session: Session, row: Destination, accepted: list[str]) -> None:
    """Keep the syntaxes a destination accepted at its first association (when none were
    given); the detection is logged as the system's change."""
    if row.syntaxes is not None or not accepted:
        return
    before = snapshot(row)
    row.syntaxes = sorted(set(accepted))
    row.updated_at = datetime.now(UTC)
    session.flush()
    audit.record(
        session,
        actor="system",
        action="detect",
        entity=ENTITY,
        entity_id=row.id,
        before=before,
        after=snapshot(row),
        reason="transfer syntaxes accepted at the first association",
    )
