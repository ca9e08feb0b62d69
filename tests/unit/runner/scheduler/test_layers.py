"""The scheduler package's layering, read from its source: only the persistence layer
(``reads`` and ``persist``) names the database's queries, and no layer reads a clock of its
own (the one injected clock is ``SchedulerState.clock``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bigtent.runner.scheduler as package

PACKAGE = Path(package.__file__).parent
PERSISTENCE = {"reads.py", "persist.py"}
MODULES = sorted(PACKAGE.glob("*.py"))


def _imports(tree: ast.AST) -> set[str]:
    """Every module the source imports, and every ``from X import Y`` as ``X.Y``."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _names_queries(tree: ast.AST) -> bool:
    return any(
        name == "bigtent.runner.db.queries" or name.startswith("bigtent.runner.db.queries.")
        for name in _imports(tree)
    )


def test_the_package_has_its_modules() -> None:
    assert {m.name for m in MODULES} >= PERSISTENCE
    assert len(MODULES) > 10


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_only_the_persistence_layer_imports_the_queries(module: Path) -> None:
    tree = ast.parse(module.read_text(), str(module))
    assert _names_queries(tree) is (module.name in PERSISTENCE)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_no_layer_reads_the_time_itself(module: Path) -> None:
    tree = ast.parse(module.read_text(), str(module))
    calls = [
        ast.unparse(node.func)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and ast.unparse(node.func) in {"time.time", "time.monotonic", "loop.time"}
    ]
    assert calls == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from bigtent.runner.db import queries", True),
        ("from bigtent.runner.db.queries import DrvInfo", True),
        ("import bigtent.runner.db.queries", True),
        ("from bigtent.runner.db import notify", False),
        ("from bigtent.runner.scheduler import reads", False),
    ],
)
def test_the_check_sees_every_form_of_import(source: str, expected: bool) -> None:
    assert _names_queries(ast.parse(source)) is expected
