"""``crgate policy list|set|preset|delete`` through typer's CliRunner on SQLite and PostgreSQL
(the database comes from CRGATE_DATABASE_URL like in production), and once through the installed
console script."""

from __future__ import annotations

import getpass
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner, Result

from services.cli import app
from services.core.db.engine import make_engine, session_factory
from services.core.db.tables import AuditEntry, Policy

CRGATE = Path(sys.executable).parent / "crgate"
EXIT_INVALID = 2
EXIT_NOT_FOUND = 6
EXIT_CONFLICT = 7

runner = CliRunner()


@pytest.fixture
def crgate(tmp_path: Path, database_url: str) -> CliRunnerCall:
    call = CliRunnerCall(tmp_path / "var", database_url)
    made = runner.invoke(
        app,
        ["migrate", "--data-dir", str(call.data_dir)],
        env={"CRGATE_DATABASE_URL": database_url},
    )
    assert made.exit_code == 0, made.output
    return call


class CliRunnerCall:
    def __init__(self, data_dir: Path, database_url: str) -> None:
        self.data_dir = data_dir
        self.database_url = database_url

    def __call__(self, *args: str) -> Result:
        return runner.invoke(
            app,
            ["policy", *args, "--data-dir", str(self.data_dir)],
            env={"CRGATE_DATABASE_URL": self.database_url, "COLUMNS": "200"},
        )

    def rows(self) -> list[Policy]:
        engine = make_engine(self.database_url)
        try:
            with session_factory(engine)() as session:
                return list(session.scalars(select(Policy).order_by(Policy.id)))
        finally:
            engine.dispose()

    def audit(self) -> list[AuditEntry]:
        engine = make_engine(self.database_url)
        try:
            with session_factory(engine)() as session:
                return list(session.scalars(select(AuditEntry).order_by(AuditEntry.id)))
        finally:
            engine.dispose()


def one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_list_shows_the_default_policy(crgate: CliRunnerCall) -> None:
    result = crgate("list")
    assert result.exit_code == 0, result.stderr
    assert "modality" in result.stdout and "25" in result.stdout and "j2k" in result.stdout
    (default,) = crgate.rows()
    assert (default.modality, default.cr) == ("*", 25)


def test_preset_then_set_with_and_without_override(crgate: CliRunnerCall) -> None:
    applied = crgate("preset", "RCR")
    assert applied.exit_code == 0, applied.stderr
    assert "preset RCR: 14 created, 0 updated, 0 unchanged, 0 kept a stricter CR" in applied.stderr
    assert "14 unchanged" in crgate("preset", "rcr").stderr

    refused = crgate("set", "--modality", "MG", "--body-part", "breast", "--cr", "30")
    assert refused.exit_code == EXIT_INVALID
    assert "above the maximum 20 set by preset RCR" in one_error_line(refused)

    allowed = crgate(
        "set",
        "--modality",
        "mg",
        "--body-part",
        "BREAST",
        "--cr",
        "30",
        "--override-reason",
        "reader study",
        "--auto-classify",
        "--quiet-seconds",
        "90",
    )
    assert allowed.exit_code == 0, allowed.stderr
    assert "(MG/BREAST, preset RCR, override): CR 30 (j2k)" in allowed.stderr
    mg = next(p for p in crgate.rows() if p.modality == "MG")
    assert (mg.cr, mg.override_reason, mg.auto_classify, mg.quiet_seconds) == (
        30,
        "reader study",
        True,
        90,
    )
    assert mg.expected_instances == 4  # kept from the preset
    listed = crgate("list")
    assert "reader study" in listed.stdout and "20 (RCR)" in listed.stdout

    last = crgate.audit()[-1]
    assert (last.actor, last.action, last.reason) == (
        f"cli:{getpass.getuser()}",
        "update",
        "reader study",
    )


def test_set_creates_a_pediatric_policy(crgate: CliRunnerCall) -> None:
    result = crgate(
        "set", "--modality", "CT", "--pediatric", "yes", "--cr", "1", "--expected-instances", "2"
    )
    assert result.exit_code == 0, result.stderr
    assert "created policy" in result.stderr and "(CT/*/pediatric): CR 1 (j2k-lossless)" in (
        result.stderr
    )
    ct = next(p for p in crgate.rows() if p.modality == "CT")
    assert (ct.pediatric, ct.syntax, ct.expected_instances) == ("yes", "j2k-lossless", 2)


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["set", "--modality", "MG", "--cr", "0"], EXIT_INVALID, "out of range"),
        (["set", "--modality", "MG"], EXIT_INVALID, "needs a CR"),
        (["set", "--modality", "MG", "--pediatric", "maybe", "--cr", "9"], EXIT_INVALID, "yes"),
        (
            ["set", "--modality", "MG", "--cr", "9", "--syntax", "j2k-lossless"],
            EXIT_INVALID,
            "CR 1",
        ),
        (["set", "--modality", "PET", "--cr", "9"], EXIT_INVALID, "PS3.3 C.7.3.1.1.1"),
        (
            ["set", "--modality", "CT", "--body-part", "BODY", "--cr", "9"],
            EXIT_INVALID,
            "not a Body Part Examined defined term of DICOM PS3.16 Annex L (CID 4031)",
        ),
        (["preset", "ACR"], EXIT_NOT_FOUND, "choose one of CAR, DRG, RCR"),
        (["delete", "999999"], EXIT_NOT_FOUND, "no policy with id 999999"),
        (["delete", "DEFAULT"], EXIT_CONFLICT, "default policy"),
    ],
)
def test_errors_are_one_line_with_the_exit_code(
    crgate: CliRunnerCall, args: list[str], code: int, words: str
) -> None:
    assert crgate("list").exit_code == 0
    (default,) = crgate.rows()
    result = crgate(*[str(default.id) if a == "DEFAULT" else a for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert words in one_error_line(result)
    assert len(crgate.rows()) == 1  # only the default; nothing half-done


def test_delete(crgate: CliRunnerCall) -> None:
    assert crgate("set", "--modality", "US", "--cr", "10").exit_code == 0
    us = next(p for p in crgate.rows() if p.modality == "US")
    result = crgate("delete", str(us.id))
    assert result.exit_code == 0, result.stderr
    assert f"deleted policy {us.id}" in result.stderr
    assert [p.modality for p in crgate.rows()] == ["*"]
    assert crgate.audit()[-1].action == "delete"


def test_console_script_has_the_policy_commands(tmp_path: Path) -> None:
    assert CRGATE.exists(), f"{CRGATE} is missing: pip install -e . into the venv"
    env = {"PATH": str(CRGATE.parent), "HOME": str(tmp_path), "USER": "tester"}
    for command in (["migrate"], ["policy", "preset", "DRG"]):
        done = subprocess.run(
            [str(CRGATE), *command, "--data-dir", str(tmp_path / "var")],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert done.returncode == 0, done.stderr
    assert "preset DRG:" in done.stderr and "created" in done.stderr


def test_preset_reports_what_it_kept_and_list_shows_violations(crgate: CliRunnerCall) -> None:
    assert crgate("set", "--modality", "MG", "--cr", "40").exit_code == 0
    assert crgate("set", "--modality", "CT", "--pediatric", "yes", "--cr", "4").exit_code == 0
    applied = crgate("preset", "CAR")
    assert applied.exit_code == 0, applied.stderr
    assert "skipped: kept the stricter CR 4" in applied.stderr
    assert "violation: policy" in applied.stderr and "(MG/*) has CR 40" in applied.stderr
    listed = crgate("list")
    assert "ABOVE MAX CR" in listed.stdout and "above the maximum 25" in listed.stderr
    forced = crgate("preset", "CAR", "--force")
    assert forced.exit_code == 0 and "0 kept a stricter CR" in forced.stderr
    ct = next(p for p in crgate.rows() if p.modality == "CT" and p.pediatric == "yes")
    assert ct.cr == 15


def test_set_gives_a_policy_actions_and_list_shows_them(crgate: CliRunnerCall) -> None:
    made = crgate("set", "--modality", "CT", "--cr", "8", "--auto-compress", "--no-keep-copy")
    assert made.exit_code == 0, made.stderr
    ct = next(p for p in crgate.rows() if p.modality == "CT")
    assert (ct.auto_compress, ct.keep_copy, ct.forward_to) == (True, False, None)
    assert "compress (not kept)" in crgate("list").stdout
    refused = crgate("set", "--modality", "CT", "--auto-classify")
    assert refused.exit_code == EXIT_INVALID
    assert "cannot classify" in one_error_line(refused)
    unknown = crgate("set", "--modality", "CT", "--forward-to", "PACS1")
    assert unknown.exit_code == EXIT_INVALID
    assert "unknown destination 'PACS1'" in one_error_line(unknown)
    what = crgate("set", "--modality", "CT", "--forward-what", "originals,everything")
    assert what.exit_code == EXIT_INVALID and "everything" in one_error_line(what)
