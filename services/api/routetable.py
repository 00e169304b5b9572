"""The route x role table (docs/routes.md), generated from the OpenAPI document.

    .venv/bin/python -m services.api.routetable > docs/routes.md

Each operation of the OpenAPI carries the role it needs (``x-crgate-role``: public, viewer,
operator, admin); tests/api/test_routetable.py checks that docs/routes.md is this table and
tests/api/test_access.py that every route enforces its role.
"""

from __future__ import annotations

from typing import Any

from services.api.routes.docs import ROLE_EXTENSION

_ORDER = {"public": 0, "viewer": 1, "operator": 2, "admin": 3}
_METHODS = ("get", "head", "post", "put", "patch", "delete", "options")


def rows(openapi: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(path, METHOD, role, summary) for every operation, sorted by path then method."""
    found = []
    for path, item in openapi.get("paths", {}).items():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            role = str(operation.get(ROLE_EXTENSION, "undeclared"))
            summary = str(operation.get("summary", "")).replace("|", "\\|")
            found.append((path, method.upper(), role, summary))
    return sorted(found, key=lambda r: (r[0], _METHODS.index(r[1].lower())))


def render(openapi: dict[str, Any]) -> str:
    """The Markdown document: counts per role, then one row per operation."""
    table = rows(openapi)
    counts = {role: sum(1 for r in table if r[2] == role) for role in _ORDER}
    lines = [
        "# Routes and the role each needs",
        "",
        "Generated from the OpenAPI document (`x-crgate-role` on each operation) by",
        "`python -m services.api.routetable > docs/routes.md`; a test fails when it is out of",
        "date, and tests/api/test_access.py checks that every protected route refuses missing,",
        "unknown and revoked keys (401) and lower roles (403). Roles include the ones below them",
        "(admin > operator > viewer).",
        "",
        ", ".join(f"{role}: {n}" for role, n in counts.items()) + f" ({len(table)} operations)",
        "",
        "| path | method | role | summary |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| `{path}` | {method} | {role} | {summary} |" for path, method, role, summary in table
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    from services.api.app import create_app
    from services.core.config import Settings

    app = create_app(Settings())
    print(render(app.openapi()), end="")


if __name__ == "__main__":
    main()
