"""The whole ``bigtent`` command tree (every command's name, help, options, their types,
defaults and environment variables, and the rendered ``--help`` of each) is what
``command_tree.json`` recorded: moving the commands between modules changes none of it.

After a deliberate change to a command, rewrite the record with
``BIGTENT_WRITE_COMMAND_TREE=1 pytest tests/unit/cli/test_command_tree.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from bigtent.cli import cli
from tests.unit.cli.helpers import run_cli

RECORD = Path(__file__).with_name("command_tree.json")
HELP_ENV = {"COLUMNS": "100"}


def _param(param: click.Parameter) -> dict[str, Any]:
    info = param.to_info_dict()
    info["metavar"] = param.metavar
    info["expose_value"] = param.expose_value
    if isinstance(param, click.Option):
        info["show_default"] = param.show_default
        info["show_envvar"] = param.show_envvar
    return info


def _context(command: click.Command, name: str, parent: click.Context | None) -> click.Context:
    """The context click makes for ``command`` (its own settings over its parent's)."""
    return click.Context(command, parent=parent, info_name=name, **command.context_settings)


def _command(command: click.Command, ctx: click.Context) -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": command.name,
        "help": command.help,
        "short_help": command.short_help,
        "epilog": command.epilog,
        "hidden": command.hidden,
        "deprecated": command.deprecated,
        "params": [_param(p) for p in command.get_params(ctx)],
        "context_settings": {
            "help_option_names": ctx.help_option_names,
            "max_content_width": ctx.max_content_width,
            "ignore_unknown_options": ctx.ignore_unknown_options,
            "allow_extra_args": ctx.allow_extra_args,
        },
    }
    if isinstance(command, click.Group):
        info["invoke_without_command"] = command.invoke_without_command
        info["commands"] = {
            name: _command(sub, _context(sub, name, ctx)) for name, sub in _subcommands(command)
        }
    return info


def command_tree() -> dict[str, Any]:
    """The tree as plain JSON values (defaults such as paths as their text)."""
    tree = _command(cli, _context(cli, "bigtent", None))
    plain: dict[str, Any] = json.loads(json.dumps(tree, default=str))
    return plain


def _subcommands(group: click.Group) -> list[tuple[str, click.Command]]:
    """The group's commands by name, loading the lazily imported ones as ``--help`` does."""
    ctx = click.Context(group)
    found = [(name, group.get_command(ctx, name)) for name in group.list_commands(ctx)]
    return [(name, command) for name, command in found if command is not None]


def _paths(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in _subcommands(group):
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _paths(command, (*prefix, name))


def help_texts() -> dict[str, str]:
    """``bigtent [COMMAND...] --help`` at 100 columns, by command path."""
    texts = {}
    for path in [(), *_paths(cli)]:
        result = run_cli([*path, "--help"], env=HELP_ENV)
        assert result.exit_code == 0, result.output
        texts[" ".join(path)] = result.stdout
    return texts


def _recorded() -> dict[str, Any]:
    now = {"tree": command_tree(), "help": help_texts()}
    if os.environ.get("BIGTENT_WRITE_COMMAND_TREE"):
        RECORD.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    recorded: dict[str, Any] = json.loads(RECORD.read_text())
    return {"now": now, "recorded": recorded}


@pytest.fixture(scope="module")
def trees() -> dict[str, Any]:
    return _recorded()


def test_the_command_tree_is_unchanged(trees: dict[str, Any]) -> None:
    assert trees["now"]["tree"] == trees["recorded"]["tree"]


def test_every_help_text_is_unchanged(trees: dict[str, Any]) -> None:
    now, recorded = trees["now"]["help"], trees["recorded"]["help"]
    assert sorted(now) == sorted(recorded)
    for path, text in recorded.items():
        assert now[path] == text, path


def test_the_record_covers_every_command(trees: dict[str, Any]) -> None:
    """The record is not trivially empty: the groups and their subcommands are in it."""
    commands = trees["recorded"]["tree"]["commands"]
    assert {"build", "agents", "token", "projects", "db", "cache", "pin"} <= set(commands)
    assert set(commands["token"]["commands"]) == {"create", "list", "revoke"}
    build_opts = {o for p in commands["build"]["params"] for o in p["opts"]}
    assert {"--runner", "--token-file", "--ca-file", "--json", "-L"} <= build_opts
