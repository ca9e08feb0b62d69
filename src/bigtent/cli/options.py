"""What the commands share: the context settings, ``--json``, ``--config``, and the client
options (``--runner``, ``--token-file``, ``--ca-file``) as one ``ClientOptions`` value that
makes the one request a read or act command sends (architecture §7)."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:  # the client modules load lazily, inside the commands
    from bigtent.client.api import RunnerClient

_T = TypeVar("_T")
_R = TypeVar("_R")
_F = TypeVar("_F", bound=Callable[..., Any])

CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
"""Every command's context settings."""

DEFAULT_RUNNER_URL = "http://127.0.0.1:8080"
"""Where ``bigtent up`` listens by default."""


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a command's coroutine to its end (each command runs one event loop)."""
    return asyncio.run(coro)


@dataclass(frozen=True)
class ClientOptions:
    """The runner a client command talks to, and how: ``--runner`` (several URLs joined by
    commas), ``--token-file`` (else ``BIGTENT_TOKEN``) and ``--ca-file``."""

    runner_url: str
    token_file: Path | None = None
    ca_file: Path | None = None

    def client(self) -> RunnerClient:
        """A client for the runner (not yet open: ``async with`` it)."""
        return make_client(self)

    def call(self, request: Callable[[RunnerClient], Awaitable[_T]]) -> _T:
        """Run one request against the runner (the shape of every read/act command)."""

        async def go() -> _T:
            async with self.client() as client:
                return await request(client)

        return run(go())


def make_client(options: ClientOptions) -> RunnerClient:
    """The ``RunnerClient`` for ``options``: its token from ``--token-file``, else from
    ``BIGTENT_TOKEN`` (the one place the CLI makes a client; tests answer it in-process)."""
    from bigtent.client.api import RunnerClient
    from bigtent.secretfile import read_secret_file

    if options.token_file is not None:
        token: str | None = read_secret_file(options.token_file, "token file")
        source = f"--token-file {options.token_file}"
    else:
        token = os.environ.get("BIGTENT_TOKEN") or None
        source = "BIGTENT_TOKEN"
    return RunnerClient(
        options.runner_url, token=token, ca_file=options.ca_file, token_source=source
    )


def client_options(f: Callable[..., _R]) -> Callable[..., _R]:
    """``--runner``, ``--token-file`` and ``--ca-file``, handed to the command as one
    ``runner: ClientOptions`` argument."""

    @functools.wraps(f)
    def command(
        *args: Any, runner_url: str, token_file: Path | None, ca_file: Path | None, **kwargs: Any
    ) -> _R:
        return f(*args, runner=ClientOptions(runner_url, token_file, ca_file), **kwargs)

    command = click.option(
        "--ca-file",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="BIGTENT_CA_FILE",
        help="CA certificate of an https runner with a private CA [env: BIGTENT_CA_FILE].",
    )(command)
    command = click.option(
        "--token-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="File holding the client token (without it: the token in BIGTENT_TOKEN, if set).",
    )(command)
    return click.option(
        "--runner",
        "runner_url",
        envvar="BIGTENT_URL",
        multiple=True,
        default=[DEFAULT_RUNNER_URL],
        show_default=True,
        metavar="URL",
        callback=_join_runner_urls,
        help="Runner URL; repeat it (or separate URLs by commas) for runners sharing one "
        "database, tried in order when one is unavailable [env: BIGTENT_URL].",
    )(command)


def _join_runner_urls(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> str:
    """``--runner`` given several times (or ``BIGTENT_URL`` with commas): one comma-separated
    string, which ``RunnerClient`` splits again."""
    return ",".join(value)


def json_option(f: _F) -> _F:
    """``--json``: print JSON for scripts (``output.emit`` chooses)."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def config_option(help: str, *, required: bool = False) -> Callable[[_F], _F]:
    """``--config FILE`` of the commands that read runner.toml or agent.toml themselves."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        required=required,
        help=help,
    )
