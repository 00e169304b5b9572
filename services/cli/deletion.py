"""``crgate delete study`` and ``crgate retention run``: deletion on an existing data directory
(services/core/deletion.py: index rows first, committed, then files; every deletion audited)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from services.cli.common import DataDir, actor, fail, out, settings_from
from services.core import deletion
from services.core.deletion import Deleted
from services.core.errors import CrgateError

delete_app = typer.Typer(
    help="Delete stored objects (audited; the files go after the index commit).",
    no_args_is_help=True,
)
retention_app = typer.Typer(
    help="Retention of crgate's derived copies (CRGATE_RETENTION_DAYS).", no_args_is_help=True
)
AsJson = Annotated[bool, typer.Option("--json", help="What was deleted, as one JSON object.")]


def _open(data_dir: Path | None) -> Any:
    from services.runtime import open_index
    from services.runtime.datadir import open_store

    settings = settings_from(data_dir=data_dir)
    return settings, open_index(settings, create=False).sessions, open_store(settings)


def _report(done: Deleted, as_json: bool) -> None:
    if as_json:
        print(json.dumps(done.as_dict()))
        return
    verb = "would delete" if done.dry_run else "deleted"
    text = (
        f"{verb} {done.studies} studies, {done.series} series, {done.instances} instances, "
        f"{done.results} results, {done.result_folders} result folders; "
        f"{done.files_removed} files removed"
    )
    if done.files_not_removed:
        text += f", {len(done.files_not_removed)} could not be removed (see the log)"
    out.print(text, markup=False, highlight=False)


@delete_app.command("study")
def delete_study_cmd(
    uid: Annotated[str, typer.Argument(help="Study Instance UID")],
    yes: Annotated[bool, typer.Option("--yes", help="Delete without asking (required).")] = False,
    as_json: AsJson = False,
    data_dir: DataDir = None,
) -> None:
    """Delete a study: every instance (crgate's derived ones too), its results and files."""
    if not yes:
        raise fail(f"deleting study {uid[:64]} cannot be undone: add --yes to delete it", 2)
    try:
        _settings, sessions, store = _open(data_dir)
        done = deletion.delete_study(sessions, store, uid, actor=actor())
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    _report(done, as_json)
    if done.files_not_removed:
        raise typer.Exit(1)


@retention_app.command("run")
def retention_run_cmd(
    days: Annotated[
        float | None,
        typer.Option("--days", help="Older than this many days [env CRGATE_RETENTION_DAYS]."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")
    ] = False,
    as_json: AsJson = False,
    data_dir: DataDir = None,
) -> None:
    """Delete crgate's derived copies and result files older than N days (originals stay)."""
    try:
        settings, sessions, store = _open(data_dir)
        wanted = days if days is not None else settings.retention_days
        if not wanted:
            raise fail("retention is off: set CRGATE_RETENTION_DAYS or give --days N", 2)
        done = deletion.run_retention(
            sessions, store, days=wanted, dry_run=dry_run, actor=deletion.RETENTION_ACTOR
        )
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    _report(done, as_json)
    if done.files_not_removed:
        raise typer.Exit(1)
