"""``crgate audit`` and the audit entries of key creation and revocation (issue 12), through
typer's CliRunner on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from services.cli import app

runner = CliRunner()


@pytest.fixture
def crgate(tmp_path: Path, database_url: str):  # type: ignore[no-untyped-def]
    env = {"CRGATE_DATABASE_URL": database_url, "COLUMNS": "200"}
    data_dir = str(tmp_path / "var")
    made = runner.invoke(app, ["migrate", "--data-dir", data_dir], env=env)
    assert made.exit_code == 0, made.output

    def call(*args: str) -> Result:
        return runner.invoke(app, [*args, "--data-dir", data_dir], env=env)

    return call


def test_key_creation_and_revocation_are_audited_and_printed(crgate) -> None:  # type: ignore[no-untyped-def]
    created = crgate("keys", "create", "--role", "operator", "--name", "ward scanner")
    assert created.exit_code == 0, created.stderr
    token = created.stdout.strip()
    prefix = token.split("_")[1]
    assert crgate("keys", "revoke", prefix).exit_code == 0
    listed = crgate("audit", "--entity", "key", "--json")
    assert listed.exit_code == 0, listed.stderr
    *entries, first_admin = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (first_admin["actor"], first_admin["after"]["role"]) == ("system", "admin")
    assert [e["action"] for e in entries] == ["revoke", "create"]  # newest first
    for entry in entries:
        assert entry["actor"].startswith("cli:") and entry["entity"] == "key"
        assert token not in json.dumps(entry) and "key_hash" not in json.dumps(entry)
    assert entries[0]["after"]["revoked_at"] and entries[1]["after"]["name"] == "ward scanner"
    table = crgate("audit")
    assert table.exit_code == 0 and "revoke" in table.stdout and "create" in table.stdout
    assert crgate("audit", "--since", "2999-01-01", "--json").stdout == ""


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--entity", "studies"), "use one of destination, forward, instance, job, key, policy"),
        (("--since", "yesterday"), "is not a date or time"),
    ],
)
def test_bad_filters_are_one_line_with_exit_2(crgate, args: tuple[str, ...], words: str) -> None:  # type: ignore[no-untyped-def]
    result = crgate("audit", *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]


@pytest.mark.tools
def test_destination_add_list_echo_delete(crgate, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import time

    from tests.conftest import free_port

    port = free_port()
    pacs = subprocess.Popen(
        ["storescp", "-aet", "PACS", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        added = crgate(
            "destination", "add", "--name", "main PACS", "--ae-title", "PACS",
            "--host", "127.0.0.1", "--port", str(port),
        )  # fmt: skip
        assert added.exit_code == 0, added.stderr
        echoed = crgate("destination", "echo", "PACS")
        assert echoed.exit_code == 0, echoed.stderr
        assert "C-ECHO status 0x0000" in echoed.stdout and "1.2.840.10008.1.2.1" in echoed.stdout
        listed = crgate("destination", "list")
        assert "main PACS" in listed.stdout and "1.2.840.10008.1.2.1" in listed.stdout
    finally:
        pacs.terminate()
        pacs.wait(10)
    down = crgate("destination", "echo", "main PACS")
    assert down.exit_code == 1 and "refused or unreachable" in down.stderr
    bad = crgate("destination", "add", "--name", "x", "--ae-title", "A" * 17,
                 "--host", "h", "--port", "1")  # fmt: skip
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert crgate("destination", "delete", "PACS").exit_code == 0
    entries = [
        json.loads(line)
        for line in crgate("audit", "--entity", "destination", "--json").stdout.splitlines()
    ]
    assert [e["action"] for e in entries] == ["delete", "detect", "create"]


def test_forward_list_and_resend(crgate, tmp_path: Path, database_url: str) -> None:  # type: ignore[no-untyped-def]
    """Failed forwards are listed and re-sent (queued again, audited; no broker: serve's next
    housekeeping pass sends them)."""
    from services.core import forwards
    from services.core.config import Settings
    from services.core.db.tables import Forward
    from services.runtime import open_index

    added = crgate(
        "destination", "add", "--name", "main PACS", "--ae-title", "PACS",
        "--host", "127.0.0.1", "--port", "11112",
    )  # fmt: skip
    assert added.exit_code == 0, added.stderr
    index = open_index(Settings(data_dir=tmp_path / "var", database_url=database_url), create=False)
    try:
        objects = [forwards.ForwardObject("1.2.3", f"1.2.3.{i}", "original") for i in (1, 2)]
        rows = forwards.request(index.sessions, None, "main PACS", objects, "test")
        with index.sessions() as session, session.begin():
            for row in rows:
                failed = session.get(Forward, row.id)
                assert failed is not None
                failed.state, failed.status, failed.error = "failed", "0xC000", "refused"
    finally:
        index.engine.dispose()
    listed = crgate("forward", "list", "--state", "failed", "--json")
    assert listed.exit_code == 0, listed.stderr
    items = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {(i["destination"], i["status"], i["error"]) for i in items} == {
        ("main PACS", "0xC000", "refused")
    }
    assert "refused" in crgate("forward", "list").stdout
    bad = crgate("forward", "list", "--state", "lost")
    assert bad.exit_code == 2 and "is not one of queued" in bad.stderr
    assert crgate("forward", "resend").exit_code == 2
    one = crgate("forward", "resend", items[0]["id"])
    assert one.exit_code == 0 and "1 forward(s) queued again" in one.stderr
    assert crgate("forward", "resend", items[0]["id"]).exit_code == 7  # queued, not failed
    rest = crgate("forward", "resend", "--all-failed", "--destination", "PACS")
    assert rest.exit_code == 0 and "1 forward(s) queued again" in rest.stderr
    queued = crgate("forward", "list", "--state", "queued", "--json").stdout.splitlines()
    assert len(queued) == 2
    audit = [
        json.loads(x) for x in crgate("audit", "--entity", "forward", "--json").stdout.splitlines()
    ]
    assert [(a["action"], a["entity_id"]) for a in audit] == [
        ("resend", None),
        ("resend", items[0]["id"]),
    ]
