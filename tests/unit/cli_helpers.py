"""Shared scaffolding of the CLI tests: running a command through the real entry point
against an in-process runner, and reading the tables the read commands print."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from bigtent import cli as cli_module
from bigtent.client.api import RunnerClient


class _Entry:
    """Lets CliRunner call ``main`` (error handling included) rather than the bare group."""

    name = "bigtent"

    def main(self, args: Any, prog_name: str, **_: Any) -> None:
        cli_module.main(list(args))


def run_cli(args: list[str], env: dict[str, str] | None = None) -> Result:
    """``bigtent ARGS`` through ``bigtent.cli.main``, as a user runs it."""
    return CliRunner().invoke(_Entry(), args, env=env)  # type: ignore[arg-type]


def answer_with(
    monkeypatch: pytest.MonkeyPatch, handler: Callable[[httpx.Request], httpx.Response]
) -> None:
    """Route every ``RunnerClient`` the CLI makes to ``handler`` (the runner, in-process)."""

    def make(runner_url: str, token_file: Path | None, ca_file: Path | None) -> RunnerClient:
        return RunnerClient(runner_url, transport=httpx.MockTransport(handler))

    monkeypatch.setattr(cli_module, "_make_client", make)


WIDE = {"COLUMNS": "250"}
"""An environment in which no table needs to fold a cell (xdist workers set ``COLUMNS=80``)."""

_COLUMN_START = re.compile(r"(?:^|(?<=\s{2}))(\S)")


def table_lines(text: str) -> tuple[str, list[str]]:
    """The header line and the body lines of the one table in ``text`` (the line of ``─``
    under the header separates them)."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.strip() and set(line.strip()) == {"─"})
    return lines[rule - 1], [line for line in lines[rule + 1 :] if line.strip()]


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of the table in ``text`` as {header: cell}, a cell folded over several lines
    joined with a space. Columns start where their header does (headers are separated by at
    least two spaces; a header may hold one, as ``last seen``)."""
    header, body = table_lines(text)
    starts = [m.start() for m in _COLUMN_START.finditer(header)]
    names = [header[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    rows: list[dict[str, str]] = []
    for line in body:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        if cells[0] or not rows:
            rows.append(dict(zip(names, cells, strict=True)))
            continue
        for name, cell in zip(names, cells, strict=True):  # a continuation line
            if cell:
                rows[-1][name] = f"{rows[-1][name]} {cell}".strip()
    return rows


def widest_line(text: str) -> int:
    return max((len(line.rstrip()) for line in text.splitlines()), default=0)
