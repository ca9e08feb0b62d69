"""The ``bigtent`` entry point and its click group: parse, call one function, render
(architecture §7).

Every ``BigtentError`` reaching ``main`` becomes one ``Error: ...`` line on stderr and the error's
exit code (2 for usage and configuration errors, 1 for failures: ``bigtent.errors``); Ctrl-C
exits 130. Logging is configured here and nowhere else. The commands live in one module per
group of commands, which the group imports only when it runs or lists one of their commands:
``bigtent build`` loads the client's modules and no runner's or agent's (``COMMAND_MODULES``).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

import click

from bigtent import __version__
from bigtent.cli.options import CONTEXT
from bigtent.errors import BigtentError

_SERVICE_COMMANDS = frozenset({"runner", "agent", "up", "nix-proxy"})

COMMAND_MODULES: dict[str, str] = {
    "build": "build",
    **dict.fromkeys(
        ("builds", "steps", "nix-hook", "nix-proxy", "log", "cancel", "restart", "bump"),
        "builds",
    ),
    **dict.fromkeys(("status", "agents", "builders", "launches"), "farm"),
    **dict.fromkeys(("keys", "token"), "tokens"),
    "ssh": "ssh",
    "db": "db",
    **dict.fromkeys(("cache", "pin", "gc"), "cache"),
    **dict.fromkeys(("runner", "agent", "up"), "services"),
    **dict.fromkeys(("projects", "evals", "jobs"), "ci"),
}
"""Each command's module in ``bigtent.cli`` (whose ``COMMANDS`` holds it): a command's run
imports its module only, so a client command pays for no runner's, agent's or database's
imports (a test checks this table against the modules)."""


def main(args: Sequence[str] | None = None) -> NoReturn:
    """Console entry point: the one place that turns failures into messages and exit codes."""
    try:
        rv = cli.main(
            args=list(args) if args is not None else None,
            prog_name="bigtent",
            standalone_mode=False,
        )
    except BigtentError as exc:
        click.echo(f"Error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):
            sys.exit(130)
        click.echo("Aborted!", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


def _configure_logging(verbose: int, service: bool) -> None:
    """Services log INFO by default, client commands only warnings; -v/-vv raise the level."""
    if verbose >= 2:
        level = logging.DEBUG
    elif verbose == 1 or service:
        level = logging.INFO
    else:
        level = logging.WARNING
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if verbose < 2:
        # alembic logs a line per plugin and per migration at INFO: `bigtent up` and the runner
        # say what the schema did in one line of their own.
        for noisy in ("httpx", "httpcore", "websockets", "aiosqlite", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


class LazyGroup(click.Group):
    """A group whose commands are imported from their module on first use (click's lazy
    loading pattern): listing them (``bigtent --help``) imports every module, running one
    imports one."""

    def __init__(self, *args: object, modules: dict[str, str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.modules = modules

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.modules})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.modules:
            module = importlib.import_module(f"bigtent.cli.{self.modules[cmd_name]}")
            for command in module.COMMANDS:
                if command.name is not None:
                    self.commands.setdefault(command.name, command)
        return self.commands.get(cmd_name)


@click.group(cls=LazyGroup, modules=COMMAND_MODULES, context_settings=CONTEXT)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(__version__, prog_name="bigtent")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """bigtent: a distributed Nix build farm with a signed binary cache."""
    _configure_logging(verbose, ctx.invoked_subcommand in _SERVICE_COMMANDS)
