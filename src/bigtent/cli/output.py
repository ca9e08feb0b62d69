"""How a command prints what it got: JSON for scripts (``--json``) or text for people, one
choice made here for every command; and the console tables are printed on."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # rich loads with the first table (a --json or plain answer needs none)
    from rich.console import Console


def emit(as_json: bool, value: Any, human: str | Callable[[], object]) -> None:
    """``--json``: ``value`` as JSON on stdout (models as their JSON form, lists of them as
    lists); otherwise ``human``: the line to print, or the function that prints for people."""
    if as_json:
        echo_json(json_value(value))
    elif isinstance(human, str):
        click.echo(human)
    else:
        human()


def json_value(value: Any) -> Any:
    """``value`` as JSON-ready data: the runner's answers as ``--json`` prints them
    (``client.printed``), lists and tuples of them each so, anything else as it is."""
    from bigtent.client.printed import printed

    return printed(value)


def echo_json(data: Any) -> None:
    """``data`` on stdout, indented, keys in their order."""
    click.echo(json.dumps(data, indent=2))


def console() -> Console:
    """A console on stdout for rich tables and lines."""
    # Piped output gets wide lines instead of rich's 80 columns with truncated cells.
    from rich.console import Console

    from bigtent.client.tables import terminal_width

    return Console(highlight=False, width=terminal_width())
