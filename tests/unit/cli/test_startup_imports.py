"""The client commands import only what they use: ``bigtent build``, ``nix-proxy`` and
``nix-hook`` start without the runner's or agent's modules, their configuration (pydantic-
settings), the database or the web framework (``cli/entry.py`` loads each command's module on
first use). A fresh interpreter runs the command as a user does and lists what it loaded."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import click
import pytest

from bigtent.cli.entry import COMMAND_MODULES, cli

NOT_ON_CLIENT_PATHS = (
    "alembic",
    "aiosqlite",
    "fastapi",
    "pydantic_settings",
    "sqlalchemy",
    "starlette",
    "uvicorn",
    "bigtent.agent",
    "bigtent.config",
    "bigtent.protocol",
    "bigtent.runner",
    "bigtent.up",
)
"""Modules (and their submodules) a client command must not import."""

_PROBE = """
import json, sys
from bigtent.cli.entry import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _loaded(args: list[str]) -> tuple[object, list[str]]:
    """Run ``bigtent ARGS`` in a fresh interpreter: its exit code and the modules it loaded."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "BIGTENT_URL": "http://127.0.0.1:1"},
    )
    result = json.loads(done.stdout.splitlines()[-1])
    return result["code"], result["modules"]


def _forbidden(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in NOT_ON_CLIENT_PATHS)]


def test_bigtent_build_loads_no_runner_agent_or_database_module() -> None:
    # A refused --repository stops the command after it imported everything it builds with
    # (the client's modules load inside the command), before it evaluates anything.
    code, modules = _loaded(["build", "--repository", "no such repository", "-E", "1"])
    assert code == 2
    assert "bigtent.client.build" in modules and "bigtent.client.follow" in modules
    assert _forbidden(modules) == []


@pytest.mark.parametrize("command", ["build", "nix-proxy", "nix-hook", "builds", "status"])
def test_client_commands_help_loads_no_runner_agent_or_database_module(command: str) -> None:
    code, modules = _loaded([command, "--help"])
    assert code == 0
    assert _forbidden(modules) == []


def test_the_probe_sees_a_forbidden_import() -> None:
    """The check can fail: ``bigtent runner --help`` loads the runner's configuration."""
    code, modules = _loaded(["runner", "--help"])
    assert code == 0
    assert "bigtent.config" in _forbidden(modules)


def test_the_command_table_names_each_modules_commands() -> None:
    found: dict[str, str] = {}
    for module_name in sorted(set(COMMAND_MODULES.values())):
        module = importlib.import_module(f"bigtent.cli.{module_name}")
        for command in module.COMMANDS:
            assert command.name is not None
            found[command.name] = module_name
    assert found == COMMAND_MODULES
    ctx = click.Context(cli)
    assert cli.list_commands(ctx) == sorted(COMMAND_MODULES)
    for name in COMMAND_MODULES:
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name
        assert command.callback is not None
