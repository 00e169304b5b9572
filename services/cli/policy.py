"""``crgate policy list|set|preset|delete``: the site's CR policies from the command line.

Changes are audit-logged with the actor ``cli:<user>``; errors end as one ``error:`` line with
the exit code of services/core/errors.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy.orm import Session, sessionmaker

from services.cli.common import DataDir, actor, err, fail, out, settings_from
from services.core import policies
from services.core.codecs import SYNTAX_HELP
from services.core.db.tables import Policy
from services.core.errors import CrgateError
from services.core.policies import PolicyChanges, PolicyKey

policy_app = typer.Typer(
    help="List and change CR policies; apply guideline presets.", no_args_is_help=True
)


def _sessions(data_dir: Path | None) -> sessionmaker[Session]:
    """The sessions of an existing data directory (DataDirMissing when there is none)."""
    from services.runtime import open_index

    return open_index(settings_from(data_dir=data_dir), create=False).sessions


def _pediatric(value: str | None) -> str:
    return policies.ANY if value is None else policies.pediatric_value(value)


def _actions(p: Policy) -> str:
    """What a policy does by itself: compress (kept or not), classify, forward to."""
    acts = []
    if p.auto_compress:
        acts.append("compress" if p.keep_copy else "compress (not kept)")
    if p.auto_classify:
        acts.append("classify")
    if p.forward_to:
        what = "+".join(p.forward_what or ("compressed", "results"))
        acts.append(f"forward {what} to {', '.join(p.forward_to)}")
    return "; ".join(acts) or "-"


def _words(value: str | None) -> list[str] | None:
    """A comma-separated option as a list ("" = none)."""
    if value is None:
        return None
    return [w.strip() for w in value.split(",") if w.strip()]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


@policy_app.command("list")
def list_cmd(data_dir: DataDir = None) -> None:
    """List policies (the most specific one that matches a study applies)."""
    try:
        with _sessions(data_dir)() as session:
            rows: list[tuple[str, ...]] = []
            found = policies.violations(session)
            for p in policies.list_policies(session):
                limit = policies.ceiling(session, PolicyKey.of_row(p), p)
                violation = next((v for v in found if v.policy_id == p.id), None)
                rows.append(
                    (
                        str(p.id),
                        p.modality,
                        p.body_part,
                        p.pediatric,
                        _num(p.cr),
                        p.syntax,
                        _actions(p),
                        _num(p.expected_instances),
                        str(p.quiet_seconds),
                        p.preset or "-",
                        f"{limit.max_cr:g} ({limit.preset})" if limit else "-",
                        p.override_reason or "-",
                        "ABOVE MAX CR" if violation else "",
                    )
                )
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    table = Table(
        "id",
        "modality",
        "body part",
        "pediatric",
        "cr",
        "syntax",
        "acts",
        "expected",
        "quiet s",
        "preset",
        "max cr",
        "override reason",
        "violation",
    )
    for row in rows:
        table.add_row(*row)
    out.print(table)
    for violation in found:
        err.print(f"violation: {violation.message}", markup=False, highlight=False)


@policy_app.command("set")
def set_cmd(
    modality: Annotated[
        str, typer.Option("--modality", help="a DICOM Modality defined term (MG, CT...) or *")
    ],
    body_part: Annotated[
        str | None,
        typer.Option(
            "--body-part",
            help="a DICOM Body Part Examined defined term (PS3.16 Annex L); left out: any",
        ),
    ] = None,
    pediatric: Annotated[
        str | None, typer.Option("--pediatric", help="yes or no; left out: any")
    ] = None,
    cr: Annotated[
        float | None,
        typer.Option("--cr", help="compression ratio (1 = lossless); needed for a new policy"),
    ] = None,
    syntax: Annotated[str | None, typer.Option("--syntax", help=SYNTAX_HELP)] = None,
    auto_classify: Annotated[
        bool | None,
        typer.Option(
            "--auto-classify/--no-auto-classify", help="classify complete studies by itself"
        ),
    ] = None,
    auto_compress: Annotated[
        bool | None,
        typer.Option(
            "--auto-compress/--no-auto-compress",
            help="compress the matching images of complete studies at the CR",
        ),
    ] = None,
    keep_copy: Annotated[
        bool | None,
        typer.Option(
            "--keep-copy/--no-keep-copy",
            help="keep compressed copies in the study (no: only send them to destinations)",
        ),
    ] = None,
    forward_to: Annotated[
        str | None,
        typer.Option(
            "--forward-to", help="destination names, comma-separated ('' stops forwarding)"
        ),
    ] = None,
    forward_what: Annotated[
        str | None,
        typer.Option(
            "--forward-what",
            help="what to forward, comma-separated: originals, compressed, results",
        ),
    ] = None,
    expected_instances: Annotated[
        int | None,
        typer.Option("--expected-instances", help="a study is complete at this many instances"),
    ] = None,
    quiet_seconds: Annotated[
        int | None,
        typer.Option("--quiet-seconds", help="a study quiet this long counts as complete"),
    ] = None,
    override_reason: Annotated[
        str | None,
        typer.Option("--override-reason", help="why the CR may exceed the guideline maximum"),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Create the policy for a modality/body part/pediatric, or change the existing one."""
    changes: PolicyChanges = {}
    if cr is not None:
        changes["cr"] = cr
    if syntax is not None:
        changes["syntax"] = syntax
    if auto_classify is not None:
        changes["auto_classify"] = auto_classify
    if auto_compress is not None:
        changes["auto_compress"] = auto_compress
    if keep_copy is not None:
        changes["keep_copy"] = keep_copy
    if forward_to is not None:
        changes["forward_to"] = _words(forward_to)
    if forward_what is not None:
        changes["forward_what"] = _words(forward_what)
    if expected_instances is not None:
        changes["expected_instances"] = expected_instances
    if quiet_seconds is not None:
        changes["quiet_seconds"] = quiet_seconds
    try:
        key = PolicyKey.of(modality, body_part, _pediatric(pediatric))
        with _sessions(data_dir).begin() as session:
            row, created = policies.set_policy(
                session, key, changes, actor=actor(), override_reason=override_reason
            )
            source = policies.source_of(row)
            cr_now, syntax_now = row.cr, row.syntax
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    verb = "created" if created else "set"
    err.print(f"{verb} {source}: CR {cr_now:g} ({syntax_now})", markup=False, highlight=False)


@policy_app.command("preset")
def preset_cmd(
    name: Annotated[str, typer.Argument(help="the preset: CAR, DRG or RCR")],
    force: Annotated[
        bool, typer.Option("--force", help="also raise policies with a stricter CR to the maximum")
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Apply a guideline preset: one policy per row; its maximum CR becomes the ceiling and the
    CR of new policies and of those above it. Stricter CRs are kept unless --force."""
    try:
        with _sessions(data_dir).begin() as session:
            result = policies.apply_preset(session, name, actor=actor(), force=force)
            found = policies.violations(session)
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    err.print(
        f"preset {result.preset}: {len(result.created)} created, {len(result.updated)} updated, "
        f"{len(result.unchanged)} unchanged, {len(result.skipped)} kept a stricter CR",
        markup=False,
        highlight=False,
    )
    for skipped in result.skipped:
        err.print(f"skipped: {skipped.reason}", markup=False, highlight=False)
    for violation in found:
        err.print(f"violation: {violation.message}", markup=False, highlight=False)


@policy_app.command("delete")
def delete_cmd(
    policy_id: Annotated[int, typer.Argument(help="the policy's id (see `crgate policy list`)")],
    data_dir: DataDir = None,
) -> None:
    """Delete a policy (not the default one)."""
    try:
        with _sessions(data_dir).begin() as session:
            policies.delete_policy(session, policy_id, actor=actor())
    except CrgateError as exc:
        raise fail(str(exc), exc.exit_code) from None
    err.print(f"deleted policy {policy_id}", markup=False, highlight=False)
