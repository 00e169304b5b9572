"""The layout's rules, read from the source (docs/ARCHITECTURE.md draws them):

- no import cycle between modules of services/ and models/ (imports inside functions count:
  a lazy import that breaks a cycle at run time still ties the two modules together);
- services/core (the gateway) imports no framework and no research code;
- services/lab (research) and the edges (api, scp, worker, cli) sit on core, never under it;
- only services/runtime assembles processes.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("services", "models")

#: what the gateway core must never import (frameworks, plotting, training, research code)
CORE_FORBIDDEN = (
    "fastapi",
    "starlette",
    "uvicorn",
    "celery",
    "kombu",
    "pynetdicom",
    "matplotlib",
    "torch",
    "typer",
    "models",
    "services.api",
    "services.scp",
    "services.worker",
    "services.cli",
    "services.runtime",
    "services.lab",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" not in path.parts:
                found[module_name(path)] = path
    return found


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(path: Path, name: str) -> Iterator[str]:
    """Every module ``path`` imports, anywhere in it but under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking_only(node):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            yield prefix
            for alias in node.names:
                yield f"{prefix}.{alias.name}"


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for imported in imported_names(path, name):
            if imported in known and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _is_package_parent(a: str, b: str) -> bool:
    """A package's __init__ importing its own submodule (and back) is not a design cycle."""
    return a.startswith(b + ".") or b.startswith(a + ".")


def test_no_import_cycle_between_modules() -> None:
    edges = graph()
    pruned = {
        node: {t for t in targets if not _is_package_parent(node, t)}
        for node, targets in edges.items()
    }
    assert cycles(pruned) == []


def test_the_walker_sees_a_cycle() -> None:
    """The check above can fail: a cycle written out is found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _imports_of(prefix: str) -> Iterator[tuple[str, str]]:
    for name, path in modules().items():
        if name == prefix or name.startswith(prefix + "."):
            for imported in imported_names(path, name):
                yield name, imported


@pytest.mark.parametrize("forbidden", CORE_FORBIDDEN)
def test_core_imports_no_framework_and_no_lab(forbidden: str) -> None:
    offending = sorted(
        f"{name} imports {imported}"
        for name, imported in _imports_of("services.core")
        if imported == forbidden or imported.startswith(forbidden + ".")
    )
    assert offending == []


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("services.lab", "services.api"),
        ("services.lab", "services.scp"),
        ("services.lab", "services.worker"),
        ("services.lab", "services.cli"),
        ("services.lab", "services.runtime"),
        ("services.runtime", "services.api"),
        ("services.runtime", "services.worker"),
        ("services.runtime", "services.cli"),
        ("services.api", "services.scp"),
        ("services.api", "services.worker"),
        ("services.api", "services.cli"),
        ("services.scp", "services.api"),
        ("services.scp", "services.worker"),
        ("services.scp", "services.runtime"),
        ("services.worker", "services.api"),
        ("services.worker", "services.scp"),
        ("services.worker", "services.cli"),
    ],
)
def test_layers_point_one_way(package: str, forbidden: str) -> None:
    offending = sorted(
        f"{name} imports {imported}"
        for name, imported in _imports_of(package)
        if imported == forbidden or imported.startswith(forbidden + ".")
    )
    assert offending == []


def test_only_the_runtime_assembles_processes() -> None:
    """The ingest path, job context, queues and forwarder are constructed in services/runtime
    (and core's own modules); the edges and the CLI call the runtime."""
    constructors = ("JobContext(", "InProcessJobQueue(", "CeleryJobQueue(", "DicomForwarder(")
    offending = []
    for name, path in modules().items():
        if name.startswith(("services.runtime", "services.core")):
            continue
        text = path.read_text()
        offending += [f"{name}: {c}" for c in constructors if c in text]
    assert offending == []
