"""``crgate forward list | resend``: objects sent (or to send) to destinations, and re-sending."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from services.cli.common import DataDir, actor, err, fail, out, settings_from
from services.core import forwards
from services.core.errors import CrgateError

forward_app = typer.Typer(
    help="List forwards (objects sent to destinations, with their states) and re-send failed ones.",
    no_args_is_help=True,
)


def _sessions(data_dir: Path | None) -> Any:
    from services.runtime import open_index

    return open_index(settings_from(data_dir=data_dir), create=False).sessions


@forward_app.command("list")
def list_cmd(
    state: Annotated[
        str | None,
        typer.Option(help=f"Only this state: {', '.join(s.value for s in forwards.ForwardState)}."),
    ] = None,
    destination: Annotated[
        str | None, typer.Option(help="Only this destination (name, AE title or id).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=forwards.MAX_LIMIT)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    data_dir: DataDir = None,
) -> None:
    """List forwards, newest first."""
    try:
        with _sessions(data_dir)() as session:
            rows, total = forwards.list_forwards(
                session, state=state, destination=destination, limit=limit
            )
            items = [forwards.snapshot(r) for r in rows]
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    if as_json:
        for item in items:
            print(json.dumps(item))
        return
    table = Table(
        "id",
        "destination",
        "what",
        "state",
        "attempts",
        "status",
        "error",
        title=f"{total} forwards",
    )
    for item in items:
        table.add_row(
            item["id"],
            Text(item["destination"]),
            item["what"],
            item["state"],
            str(item["attempts"]),
            item["status"] or "-",
            Text(item["error"] or ""),
        )
    out.print(table)


@forward_app.command("resend")
def resend_cmd(
    forward_id: Annotated[str | None, typer.Argument(help="the forward's id")] = None,
    all_failed: Annotated[
        bool, typer.Option("--all-failed", help="every failed forward (of --destination)")
    ] = False,
    destination: Annotated[
        str | None, typer.Option(help="with --all-failed: only this destination")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Send failed forwards again (audit-logged): one by id, or --all-failed."""
    from services.runtime.queue import producer_queue

    if (forward_id is None) == (not all_failed) or (destination and not all_failed):
        raise fail("give a forward id, or --all-failed [--destination NAME]", 2)
    settings = settings_from(data_dir=data_dir)
    queue = producer_queue(settings)
    try:
        ids = forwards.resend(
            _sessions(data_dir),
            queue,
            actor=actor(),
            forward_id=forward_id,
            destination=destination,
        )
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    finally:
        if queue is not None:
            queue.close()
    where = "queued for its worker" if queue is not None else "sent by crgate serve's next pass"
    err.print(f"{len(ids)} forward(s) queued again ({where})", markup=False, highlight=False)
