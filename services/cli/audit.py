"""``crgate audit``: the audit log of an existing data directory, newest first."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from services.cli.common import DataDir, fail, out, settings_from
from services.core import audit as audit_log
from services.core.errors import CrgateError, InvalidParameter


def audit(
    entity: Annotated[
        str | None,
        typer.Option(help=f"Only this entity: {', '.join(audit_log.ENTITIES)}."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Only entries at or after this time: 2026-12-01 or 2026-12-01T08:00."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=audit_log.MAX_LIMIT)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Print the audit log: who changed what (policies, keys, overrides), when and why."""
    from services.runtime import open_index

    try:
        start = _parse_since(since)
        sessions = open_index(settings_from(data_dir=data_dir), create=False).sessions
        with sessions() as session:
            rows, total = audit_log.entries(session, entity=entity, since=start, limit=limit)
            items = [
                {
                    "id": r.id,
                    "at": r.at.isoformat(),
                    "actor": r.actor,
                    "action": r.action,
                    "entity": r.entity,
                    "entity_id": r.entity_id,
                    "before": r.before,
                    "after": r.after,
                    "reason": r.reason,
                }
                for r in rows
            ]
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    if as_json:
        for item in items:
            print(json.dumps(item))
        return
    table = Table("at", "actor", "action", "entity", "id", "reason", title=f"{total} entries")
    for item in items:
        table.add_row(
            str(item["at"])[:19],
            Text(str(item["actor"])),
            str(item["action"]),
            str(item["entity"]),
            str(item["entity_id"] or "-"),
            Text(str(item["reason"] or "")),
        )
    out.print(table)


def _parse_since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise InvalidParameter(
            f"--since {text[:40]!r} is not a date or time: use 2026-12-01 or 2026-12-01T08:00"
        ) from None
