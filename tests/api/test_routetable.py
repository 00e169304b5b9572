"""docs/routes.md is the route x role table of the OpenAPI, and every operation declares one."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from services.api.routetable import render, rows

DOC = Path(__file__).resolve().parents[2] / "docs" / "routes.md"


def test_every_operation_declares_its_role(app: FastAPI) -> None:
    table = rows(app.openapi())
    assert len(table) > 40
    undeclared = [
        (p, m) for p, m, role, _ in table if role not in ("public", "viewer", "operator", "admin")
    ]
    assert undeclared == []
    roles = {(p, m): role for p, m, role, _ in table}
    assert roles[("/healthz", "GET")] == "public"
    assert roles[("/policies", "POST")] == "admin"
    assert roles[("/studies/{study_uid}/compress", "POST")] == "operator"
    assert roles[("/dicomweb/studies", "GET")] == "viewer"


def test_docs_routes_md_is_up_to_date(app: FastAPI) -> None:
    expected = render(app.openapi())
    assert DOC.read_text() == expected, (
        "docs/routes.md is out of date: run `python -m services.api.routetable > docs/routes.md`"
    )
