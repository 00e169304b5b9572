"""``crgate keys create | list | revoke``: API keys of an existing data directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from services.cli.common import DataDir, actor, err, fail, out, settings_from
from services.core.errors import CrgateError

keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)


def _key_sessions(data_dir: Path | None) -> Any:
    """The sessions of an existing data directory (DataDirMissing when there is none)."""
    from services.runtime import open_index

    return open_index(settings_from(data_dir=data_dir), create=False).sessions


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option("--role", help="admin, operator or viewer")],
    name: Annotated[str, typer.Option("--name", help="who or what uses the key")],
    data_dir: DataDir = None,
) -> None:
    """Create a key and print it once (only its hash is kept)."""
    from services.core.auth import create_key, parse_role

    try:
        sessions = _key_sessions(data_dir)
        with sessions() as session, session.begin():
            row, token = create_key(session, name=name, role=parse_role(role), actor=actor())
            key_id = row.id
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    err.print(f"created key {key_id} ({role}, {name!r}); it is shown once:")
    print(token)


@keys_app.command("list")
def keys_list(data_dir: DataDir = None) -> None:
    """List keys (id, prefix, role, name, created, last used, revoked); never the secrets."""
    from services.core.auth import list_keys

    try:
        sessions = _key_sessions(data_dir)
        with sessions() as session:
            rows = list_keys(session)
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    table = Table("id", "prefix", "role", "name", "created", "last used", "revoked")
    for r in rows:
        table.add_row(
            str(r.id),
            r.prefix,
            r.role,
            r.name,
            f"{r.created_at:%Y-%m-%d %H:%M}",
            f"{r.last_used_at:%Y-%m-%d %H:%M}" if r.last_used_at else "-",
            f"{r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else "-",
        )
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="the key's id or prefix (see `crgate keys list`)")],
    data_dir: DataDir = None,
) -> None:
    """Revoke a key: requests with it, and browser sessions logged in with it, get 401 from now
    on."""
    from services.core.auth import revoke_key

    try:
        sessions = _key_sessions(data_dir)
        with sessions() as session, session.begin():
            row = revoke_key(session, key=key, actor=actor())
            key_id, name = row.id, row.name
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    err.print(f"revoked key {key_id} ({name!r}); its browser sessions end too")
