"""The config package sits below the runner and the agent: importing it, or any agent module,
loads no ``bigtent.runner`` module (and config no ``bigtent.agent`` one either). Each check
runs in a fresh interpreter, where nothing else has been imported yet."""

from __future__ import annotations

import subprocess
import sys

import pytest

_LOADED = """
import importlib, pkgutil, sys
package = importlib.import_module({package!r})
for info in pkgutil.walk_packages(getattr(package, "__path__", []), {package!r} + "."):
    importlib.import_module(info.name)
print("\\n".join(sorted(m for m in sys.modules if m.startswith("bigtent"))))
"""


def loaded_by(package: str) -> set[str]:
    """Every ``bigtent`` module loaded by importing ``package`` and all its submodules."""
    code = _LOADED.format(package=package)
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    )
    return set(out.stdout.split())


def under(modules: set[str], package: str) -> set[str]:
    return {m for m in modules if m == package or m.startswith(package + ".")}


def test_the_agent_loads_no_runner_module() -> None:
    loaded = loaded_by("bigtent.agent")
    assert "bigtent.agent.session" in loaded and "bigtent.config" in loaded
    assert under(loaded, "bigtent.runner") == set()


def test_config_loads_neither_runner_nor_agent() -> None:
    loaded = loaded_by("bigtent.config")
    assert "bigtent.config.runner" in loaded
    assert under(loaded, "bigtent.runner") == set()
    assert under(loaded, "bigtent.agent") == set()


@pytest.mark.parametrize("package", ["bigtent.secretfile", "bigtent.graphs", "bigtent.tlsctx"])
def test_the_shared_helpers_load_no_runner_or_agent_module(package: str) -> None:
    loaded = loaded_by(package)
    assert package in loaded
    assert under(loaded, "bigtent.runner") | under(loaded, "bigtent.agent") == set()
