"""``crgate destination add | list | echo | delete``: the PACS crgate forwards to."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from services.cli.common import DataDir, actor, err, fail, out, settings_from
from services.core import destinations
from services.core.destinations import DestinationSpec
from services.core.errors import CrgateError

destination_app = typer.Typer(
    help="Add, list, echo and delete destinations (the PACS crgate forwards to).",
    no_args_is_help=True,
)


def _sessions(data_dir: Path | None) -> Any:
    from services.runtime import open_index

    return open_index(settings_from(data_dir=data_dir), create=False).sessions


@destination_app.command("add")
def add_cmd(
    name: Annotated[str, typer.Option("--name", help="what people call it, e.g. 'main PACS'")],
    ae_title: Annotated[str, typer.Option("--ae-title", help="its AE title")],
    host: Annotated[str, typer.Option("--host", help="host name or IP address")],
    port: Annotated[int, typer.Option("--port", help="DICOM port")],
    syntax: Annotated[
        list[str] | None,
        typer.Option(
            "--syntax", help="a transfer syntax UID it accepts (repeat); left out: detected"
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Add a destination."""
    try:
        with _sessions(data_dir).begin() as session:
            spec = DestinationSpec(name, ae_title, host, port, syntax or None)
            row = destinations.create_destination(session, spec, actor=actor())
            text = f"added destination {row.id}: {row.name} ({row.ae_title}@{row.host}:{row.port})"
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    err.print(text, markup=False, highlight=False)


@destination_app.command("list")
def list_cmd(data_dir: DataDir = None) -> None:
    """List destinations."""
    try:
        with _sessions(data_dir)() as session:
            rows = [
                (str(r.id), r.name, r.ae_title, r.host, str(r.port), " ".join(r.syntaxes or ["?"]))
                for r in destinations.list_destinations(session)
            ]
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    table = Table("id", "name", "AE title", "host", "port", "syntaxes (? = not yet detected)")
    for row in rows:
        table.add_row(*row)
    out.print(table)


@destination_app.command("echo")
def echo_cmd(
    key: Annotated[str, typer.Argument(help="id, name or AE title")],
    data_dir: DataDir = None,
) -> None:
    """C-ECHO a destination: status, round-trip time, accepted syntaxes (exit 1 unreachable)."""
    from services.runtime.forwarding import echo

    settings = settings_from(data_dir=data_dir)
    try:
        sessions = _sessions(data_dir)
        with sessions.begin() as session:
            row = destinations.get_destination(session, key)
            row_id, target = row.id, f"{row.ae_title}@{row.host}:{row.port}"
        result = echo(target, settings.ae_title)
        if result.reachable:
            with sessions.begin() as session:
                row = destinations.get_destination(session, row_id)
                destinations.record_detected(session, row, result.accepted_syntaxes)
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    if not result.reachable:
        raise fail(f"{target}: {result.error} ({result.rtt_ms:.0f} ms)", 1)
    status = "none" if result.status is None else f"0x{result.status:04X}"
    out.print(
        f"{target}: C-ECHO status {status} in {result.rtt_ms:.1f} ms; accepts "
        f"{', '.join(result.accepted_syntaxes) or 'no probed syntax'}",
        markup=False,
        highlight=False,
    )


@destination_app.command("delete")
def delete_cmd(
    key: Annotated[str, typer.Argument(help="id, name or AE title")],
    data_dir: DataDir = None,
) -> None:
    """Delete a destination."""
    try:
        with _sessions(data_dir).begin() as session:
            destinations.delete_destination(session, key, actor=actor())
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    err.print(f"deleted destination {key}", markup=False, highlight=False)
