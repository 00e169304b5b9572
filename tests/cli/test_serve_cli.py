"""``crgate api|scp|serve`` options and ``crgate keys create|list|revoke`` through typer's
CliRunner, against a temporary data directory (its SQLite index)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from services.cli import app
from services.core.auth import Role, verify_key
from services.core.db.engine import make_engine, session_factory

runner = CliRunner()
SERVER_OPTIONS = ("--data-dir", "--http-port", "--dicom-port", "--ae-title")
ENV = {"COLUMNS": "200", "CRGATE_DATABASE_URL": ""}  # SQLite under --data-dir


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args), env=ENV)


@pytest.mark.parametrize("command", ["api", "scp", "serve"])
def test_every_server_command_takes_the_four_options(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    for option in (*SERVER_OPTIONS, "--allowed-ae"):
        assert option in result.output, f"crgate {command} --help lacks {option}"


def key_row(listed: Result, prefix: str) -> list[str]:
    """The cells (id, prefix, role, name, created, last used, revoked) of one key's row."""
    (row,) = [line for line in listed.stdout.splitlines() if f" {prefix} " in line]
    return [cell.strip() for cell in row.strip().strip("│").split("│")]


def verify(data_dir: Path, token: str) -> Role | None:
    """The role services.core.auth grants ``token`` (None: refused)."""
    engine = make_engine(f"sqlite:///{(data_dir / 'crgate.db').resolve()}")
    try:
        with session_factory(engine)() as session, session.begin():
            principal = verify_key(session, token)
            return principal.role if principal else None
    finally:
        engine.dispose()


def test_migrate_creates_a_data_directory_and_says_so(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    made = invoke("migrate", "--data-dir", str(data_dir))
    assert made.exit_code == 0, made.output
    assert f"created a new crgate data directory in {data_dir}" in made.stderr
    assert (data_dir / "crgate.db").is_file() and (
        data_dir / "admin.key"
    ).stat().st_mode & 0o777 == 0o600
    again = invoke("migrate", "--data-dir", str(data_dir))
    assert again.exit_code == 0 and "created" not in again.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("keys", "create", "--role", "operator", "--name", "ci"),
        ("keys", "list"),
        ("keys", "revoke", "1"),
        ("policy", "list"),
        ("policy", "preset", "DRG"),
    ],
)
def test_a_command_in_the_wrong_folder_stops_and_creates_nothing(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """Before: `crgate keys create` in the wrong folder made an empty database there and
    printed "created key 1" for a key that worked nowhere."""
    wrong = tmp_path / "not-a-data-dir"
    result = invoke(*command, "--data-dir", str(wrong))
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: no crgate data directory at {wrong}")
    assert "crgate migrate" in line
    assert not wrong.exists() or not any(wrong.iterdir())
    assert "created key" not in result.output


@pytest.mark.parametrize("command", ["api", "scp", "worker"])
def test_servers_other_than_serve_need_an_existing_data_directory(
    tmp_path: Path, command: str
) -> None:
    env = {**ENV, "CRGATE_BROKER_URL": "redis://127.0.0.1:6379/15"}
    wrong = tmp_path / "nothing-here"
    result = runner.invoke(app, [command, "--data-dir", str(wrong)], env=env)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: no crgate data directory at {wrong}")
    assert not (wrong / "crgate.db").exists()


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "var")
    assert invoke("migrate", "--data-dir", data_dir).exit_code == 0
    created = invoke("keys", "create", "--role", "operator", "--name", "ci", "--data-dir", data_dir)
    assert created.exit_code == 0, created.output
    (token,) = created.stdout.split()  # stdout holds the key alone, once
    match = re.fullmatch(r"crg_([0-9a-f]{8})_\S+", token)
    assert match is not None, token
    prefix = match.group(1)
    assert "shown once" in created.stderr and token not in created.stderr
    assert verify(tmp_path / "var", token) is Role.OPERATOR

    listed = invoke("keys", "list", "--data-dir", data_dir)
    assert listed.exit_code == 0, listed.output
    assert key_row(listed, prefix)[1:4] == [prefix, "operator", "ci"]
    assert key_row(listed, prefix)[6] == "-"  # not revoked
    assert token.split("_", 2)[2] not in listed.output  # the secret

    revoked = invoke("keys", "revoke", prefix, "--data-dir", data_dir)
    assert revoked.exit_code == 0, revoked.output
    assert "revoked key" in revoked.stderr
    assert verify(tmp_path / "var", token) is None
    revoked_at = key_row(invoke("keys", "list", "--data-dir", data_dir), prefix)[6]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", revoked_at), revoked_at


def test_revoking_an_unknown_key_fails(tmp_path: Path) -> None:
    assert invoke("migrate", "--data-dir", str(tmp_path / "var")).exit_code == 0
    result = invoke("keys", "revoke", "nosuchkey", "--data-dir", str(tmp_path / "var"))
    assert result.exit_code != 0
    assert result.stderr.startswith("error: no API key")
