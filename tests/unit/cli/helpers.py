"""Shared scaffolding of the CLI tests: running a command through the real entry point, a
runner answered in-process (``RunnerStub``, the ``runner_stub`` fixture of ``conftest.py``),
and reading the tables the read commands print. The integration and e2e tests of the CLI use
these too."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from bigtent import cli as cli_module
from bigtent.cli import options
from bigtent.client.api import RunnerClient

Handler = Callable[[httpx.Request], httpx.Response]


class _Entry:
    """Lets CliRunner call ``main`` (error handling included) rather than the bare group."""

    name = "bigtent"

    def main(self, args: Any, prog_name: str, **_: Any) -> None:
        cli_module.main(list(args))


def run_cli(args: list[str], env: dict[str, str] | None = None) -> Result:
    """``bigtent ARGS`` through ``bigtent.cli.main``, as a user runs it."""
    return CliRunner().invoke(_Entry(), args, env=env)  # type: ignore[arg-type]


ADMIN_ENV = {"BIGTENT_TOKEN": "root"}
"""The environment of a command run with the admin token ``root`` (see ``admin_only``)."""


def admin_only(handler: Handler) -> Handler:
    """``handler`` behind a runner that knows one admin token, ``root``: any other token is
    refused as a client token (403)."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") != "Bearer root":
            return httpx.Response(403, json={"error": "token role client may not do this"})
        return handler(request)

    return answer


class RunnerStub:
    """The runner every ``RunnerClient`` the CLI makes talks to: ``handler``, in-process.

    The client keeps what the real one would send: the token from ``--token-file`` or
    ``BIGTENT_TOKEN`` and where it came from. ``seen`` holds every request, in order.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[httpx.Request] = []
        self._handler: Handler = self._unanswered
        real = options.make_client

        def make(opts: options.ClientOptions) -> RunnerClient:
            client = real(opts)
            token = client._http.headers.get("authorization", "").removeprefix("Bearer ") or None
            return RunnerClient(
                opts.runner_url,
                token=token,
                transport=httpx.MockTransport(self._answer),
                token_source=client.token_source,
            )

        monkeypatch.setattr(options, "make_client", make)

    def answer(self, handler: Handler) -> list[httpx.Request]:
        """Answer every request with ``handler``; the requests seen (this list fills up)."""
        self._handler = handler
        return self.seen

    def answer_json(self, path: str, body: Any) -> list[httpx.Request]:
        """Answer ``path`` (and only it: anything else fails the test) with ``body``."""

        def handler(request: httpx.Request) -> httpx.Response:
            assert request.url.path == path
            return httpx.Response(200, json=body)

        return self.answer(handler)

    def answer_status(self, status: int, body: Any) -> list[httpx.Request]:
        """Answer every request with HTTP ``status`` and the JSON ``body``."""
        return self.answer(lambda request: httpx.Response(status, json=body))

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return self._handler(request)

    @staticmethod
    def _unanswered(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no answer set for {request.method} {request.url}")


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
