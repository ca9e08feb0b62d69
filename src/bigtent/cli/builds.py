"""The builds on the runner: ``bigtent builds``, ``steps`` and ``log`` read them; ``cancel``,
``restart`` and ``bump`` act on one; ``nix-hook`` is Nix's build hook, ``nix-proxy`` a Nix
store whose builds run on the farm."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from bigtent.apilimits import PRIORITY_MAX, PRIORITY_MIN
from bigtent.cli.options import CONTEXT, ClientOptions, client_options, json_option
from bigtent.cli.output import emit

if TYPE_CHECKING:
    from bigtent.apimodels import Build, Step

_BUILD_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def build_line(b: Build) -> str:
    """``build 12: running, priority 10, 1/3 built ...``: a build after an action on it."""
    from bigtent.client.reports import progress_line

    return f"build {b.id}: {b.state.value}, priority {b.priority}, {progress_line(b)}"


@click.command(context_settings=CONTEXT)
@client_options
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="Builds shown."
)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(_BUILD_STATES),
    help="Only builds in this state (repeatable).",
)
@click.option("--repository", metavar="OWNER/NAME", help="Only builds for this repository.")
@click.option("--ref", metavar="REF", help="Only builds for this git ref.")
@click.option("--mine", is_flag=True, help="Only builds created with this client's token.")
@json_option
def builds(
    runner: ClientOptions,
    limit: int,
    states: tuple[str, ...],
    repository: str | None,
    ref: str | None,
    mine: bool,
    as_json: bool,
) -> None:
    """List recent builds, newest first (the runner filters them)."""

    rows = runner.call(
        lambda c: c.fetch_builds(
            limit=limit, states=states, repository=repository, ref=ref, mine=mine
        )
    )
    emit(as_json, rows, lambda: _print_builds(rows))


def _print_builds(rows: list[Build]) -> None:
    from bigtent.client.tables import BUILD_COLUMNS, build_row, now_utc, print_table

    if not rows:
        click.echo("no builds", err=True)
        return
    now = now_utc()
    print_table(BUILD_COLUMNS, [build_row(b, now) for b in rows])


@click.command(context_settings=CONTEXT)
@click.argument("build_id", metavar="BUILD")
@client_options
@json_option
def steps(build_id: str, runner: ClientOptions, as_json: bool) -> None:
    """List the steps of BUILD: name, state, agent, infrastructure retries, when it started,
    how long it took, and how it ended (or why it waits for capacity).

    `bigtent log STEP` shows a step's log."""
    rows = runner.call(lambda c: c.fetch_steps(build_id))
    emit(as_json, rows, lambda: _print_steps(build_id, rows))


def _print_steps(build_id: str, rows: list[Step]) -> None:
    from bigtent.client.tables import STEP_COLUMNS, now_utc, print_table, step_row

    if not rows:
        click.echo(f"build {build_id} has no steps: its outputs were cached", err=True)
        return
    now = now_utc()
    print_table(STEP_COLUMNS, [step_row(s, now) for s in rows])


@click.command(
    "nix-hook",
    context_settings={**CONTEXT, "ignore_unknown_options": True, "allow_extra_args": True},
)
@click.pass_context
def nix_hook(ctx: click.Context) -> None:
    """Nix's build hook: plain nix-build / nix build build on the farm (docs/nix-integration.md).

    nix.conf: build-hook = a wrapper running `bigtent-nix-hook --runner URL --token-file FILE
    "$@"` (this command is the same program; `bigtent-nix-hook --help` lists its options).
    """
    from bigtent.client.hookentry import main as hook_main

    ctx.exit(hook_main(ctx.args))


@click.command("nix-proxy", context_settings=CONTEXT)
@client_options
@click.option(
    "--socket",
    required=True,
    metavar="PATH",
    help="Listen here; Nix uses it as `--store unix://PATH` (or `store = unix://PATH`).",
)
@click.option(
    "--store",
    default="",
    metavar="URI",
    help="The local store behind the proxy (e.g. local?root=DIR) [default: Nix's own].",
)
@click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    metavar="KEY",
    help="Trust only this key for the outputs (repeatable) [default: the runner's keys].",
)
def nix_proxy(runner: ClientOptions, socket: str, store: str, public_keys: tuple[str, ...]) -> None:
    """A Nix store on a Unix socket whose builds run on the farm: `nix build --store
    unix://PATH`, `nix-build --store unix://PATH` send the whole DAG as one build, and the
    outputs come back into the local store checked by the runner's key
    (docs/nix-integration.md)."""
    import asyncio
    import contextlib

    from bigtent.client.storeproxy import ProxyConfig, serve

    config = ProxyConfig(
        runner_url=runner.runner_url,
        connect=runner.client,
        socket=socket,
        store=store,
        public_keys=public_keys,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config))


@click.command("log", context_settings=CONTEXT)
@click.argument("step")
@client_options
@click.option(
    "-f/-F",
    "--follow/--no-follow",
    default=None,
    help="Keep printing the log as it grows until the step ends [default: --follow while "
    "the step runs or waits, --no-follow once it ended].",
)
def log_cmd(step: str, runner: ClientOptions, follow: bool | None) -> None:
    """Print the build log of STEP (ids: `bigtent steps BUILD`), following it while it runs."""
    from bigtent.client.progress import print_step_log

    def out(text: str) -> None:
        click.echo(text, nl=False)
        sys.stdout.flush()

    ended_line = runner.call(lambda c: print_step_log(c, step, out, follow=follow))
    if not ended_line:
        click.echo()


@click.command(context_settings=CONTEXT)
@click.argument("build_id", metavar="BUILD")
@client_options
@json_option
def cancel(build_id: str, runner: ClientOptions, as_json: bool) -> None:
    """Cancel BUILD (steps other builds still need keep running)."""

    b = runner.call(lambda c: c.cancel_build(build_id))
    emit(as_json, b, build_line(b))


@click.command(context_settings=CONTEXT)
@click.argument("build_id", metavar="BUILD")
@client_options
@json_option
def restart(build_id: str, runner: ClientOptions, as_json: bool) -> None:
    """Rebuild BUILD's failed, dependency-failed and cancelled steps.

    Clears the cached failures of its failed steps, which new builds otherwise do not
    rebuild until scheduler.failure_cache_ttl_secs has passed.
    """

    b = runner.call(lambda c: c.restart_build(build_id))
    emit(as_json, b, build_line(b))


@click.command(context_settings=CONTEXT)
@click.argument("build_id", metavar="BUILD")
@click.option(
    "--priority",
    type=click.IntRange(PRIORITY_MIN, PRIORITY_MAX),
    help="New priority [default: current + 10].",
)
@client_options
@json_option
def bump(build_id: str, priority: int | None, runner: ClientOptions, as_json: bool) -> None:
    """Raise the priority of BUILD."""

    b = runner.call(lambda c: c.bump_build(build_id, priority=priority))
    emit(as_json, b, build_line(b))


COMMANDS = (builds, steps, nix_hook, nix_proxy, log_cmd, cancel, restart, bump)
