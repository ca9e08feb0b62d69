"""What the farm has: ``bigtent status`` (the runner, its cache and queue), ``agents`` (and
``agents drain``), ``builders`` (the SSH builders) and ``launches`` (the autoscaler's)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import click
from rich.table import Table

from bigtent import humanize
from bigtent.cli.options import CONTEXT, ClientOptions, client_options, json_option
from bigtent.cli.output import console, emit

if TYPE_CHECKING:
    from bigtent.apimodels import Agent, Builder, RunnerStatus
    from bigtent.client.models import Launches


@click.command(context_settings=CONTEXT)
@client_options
@json_option
def status(runner: ClientOptions, as_json: bool) -> None:
    """Show the runner's version, cache and queue."""

    st = runner.call(lambda c: c.fetch_status())
    emit(as_json, st, lambda: _print_status(runner.runner_url, st))


def _print_status(runner_url: str, st: RunnerStatus) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("runner", runner_url)
    table.add_row("version", st.version)
    table.add_row("cache", st.cache_url)
    table.add_row("public key", st.cache_public_key)
    if st.untrusted_cache_url:
        key = st.untrusted_cache_public_key or "?"
        table.add_row("untrusted cache", f"{st.untrusted_cache_url} ({key})")
    for up in st.upstreams:
        table.add_row("upstream", f"{up.url} ({up.public_key})")
    table.add_row("agents connected", str(st.agents_connected))
    table.add_row("builds active", str(st.builds_active))
    if st.steps_waiting_for_capacity:
        table.add_row(
            "waiting for capacity",
            f"{st.steps_waiting_for_capacity} step(s) no agent, SSH builder or pool can take",
        )
    if st.steps is None:
        steps = "unknown (the runner's database does not answer)"
    else:
        steps = ", ".join(f"{k} {v}" for k, v in sorted(st.steps.items()) if v) or "none"
    table.add_row("steps", steps)
    console().print(table)


_AGENT_COLUMNS = (
    ("name", True),
    ("kind", False),
    ("trust", False),
    ("auth", False),
    ("connected", False),
    ("health", False),
    ("last seen", True),
    ("jobs", False),
    ("backoff", False),
    ("systems", False),
    ("features", False),
    ("launch", True),  # an id a reader copies: never folded
)
_HEALTH_ERROR_CHARS = 80


def _agent_auth(a: Agent) -> str:
    """``token``, or ``oidc:<repository>`` for an agent that authenticated as a CI job."""
    if a.oidc is not None:
        return f"oidc:{a.oidc.repository}"
    return a.auth_kind or "-"


def _agent_trust(a: Agent) -> str:
    """``trusted``/``untrusted`` and, for a venue scoped to repositories, which ones."""
    trust = "trusted" if a.trusted else "untrusted"
    if a.build_repositories is not None:
        trust += " " + ",".join(a.build_repositories)
    return trust


def _agent_health(a: Agent) -> str:
    """``ok``, or ``unhealthy: <first line of its last error>``."""
    if not a.unhealthy:
        return "ok"
    first = (a.last_error or "").strip().splitlines()
    return "unhealthy: " + (first[0][:_HEALTH_ERROR_CHARS] if first else "no error text")


def _agent_row(a: Agent, now: datetime) -> list[str]:
    features = [*a.supported_features, *(f"{f}!" for f in a.mandatory_features)]
    connected = "yes" if a.connected else "no"
    if a.draining:
        connected += " (draining)"
    backoff = "-"
    if a.backoff_until:
        until = humanize.relative_iso(a.backoff_until, now)
        until = until if until.startswith("in ") else f"until {until}"  # "in 30 s"
        backoff = f"{until} ({a.consecutive_failures} failures)"
    return [
        a.name,
        "ephemeral" if a.ephemeral else "persistent",
        _agent_trust(a),
        _agent_auth(a),
        connected,
        _agent_health(a),
        humanize.relative_iso(a.last_seen, now),
        f"{a.running}/{a.max_jobs}",
        backoff,
        ", ".join(a.systems),
        ", ".join(features),
        a.launch_id or "-",
    ]


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@client_options
@json_option
@click.pass_context
def agents(ctx: click.Context, runner: ClientOptions, as_json: bool) -> None:
    """List the agents the runner knows (mandatory features end in '!').

    `bigtent agents drain NAME` drains one.
    """
    if ctx.invoked_subcommand is not None:
        return

    rows = runner.call(lambda c: c.fetch_agents())
    emit(as_json, rows, lambda: _print_agents(rows))


def _print_agents(rows: list[Agent]) -> None:
    from bigtent.client.tables import Column, now_utc, print_table

    now = now_utc()
    columns = [Column(header, key=key) for header, key in _AGENT_COLUMNS]
    print_table(columns, [_agent_row(a, now) for a in rows])


@agents.command("drain", context_settings=CONTEXT)
@click.argument("name")
@client_options
@json_option
def agents_drain(name: str, runner: ClientOptions, as_json: bool) -> None:
    """Drain agent NAME: it finishes its running steps and takes no new ones (admin token)."""

    drained = runner.call(lambda c: c.drain_agent(name))
    emit(as_json, {"drained": drained}, f"agent {drained} is draining")


@click.command(context_settings=CONTEXT)
@client_options
@json_option
def builders(runner: ClientOptions, as_json: bool) -> None:
    """List the SSH remote builders: usable or skipped (and why), load and backoff."""
    rows = runner.call(lambda c: c.fetch_builders())
    emit(as_json, rows, lambda: _print_builders(rows))


def _print_builders(rows: list[Builder]) -> None:
    from bigtent.client.tables import Column, now_utc, print_table

    now = now_utc()
    columns = [Column("uri", key=True)] + [
        Column(c) for c in ("state", "systems", "features", "jobs", "speed", "backoff until")
    ]
    table_rows = []
    for b in rows:
        features = [*b.supported_features, *(f"{m}!" for m in b.mandatory_features)]
        table_rows.append(
            [
                b.uri,
                "usable" if b.usable else f"skipped: {b.reason}",
                ", ".join(b.systems),
                ", ".join(features),
                f"{b.running}/{b.max_jobs}" if b.usable else "",
                f"{b.speed_factor:g}" if b.usable else "",
                humanize.relative_iso(b.backoff_until, now, missing=""),
            ]
        )
    print_table(columns, table_rows)


@click.command(context_settings=CONTEXT)
@client_options
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--pool", help="Only this pool's launches.")
@json_option
def launches(runner: ClientOptions, limit: int, pool: str | None, as_json: bool) -> None:
    """List the autoscaler's pools and launches, newest first (admin token)."""
    data = runner.call(lambda c: c.fetch_launches(limit=limit, pool=pool))
    emit(as_json, data, lambda: _print_launches(data))


def _print_launches(data: Launches) -> None:
    out = console()
    if not data.pools:
        out.print("no [[autoscale.github]] pools configured")
    for p in data.pools:
        c = p.counters
        cooling = f", cooling down until {p.cooldown_until}" if p.cooldown_until else ""
        out.print(
            f"pool {p.name} ({p.workflow}): {p.pending}/{p.max_inflight} pending, "
            f"{p.demand} steps waiting, deficit {p.deficit}{cooling}; launched {c.launches}, "
            f"registered {c.registrations}, expired {c.expiries}, "
            f"dispatch failures {c.dispatch_failures}"
        )
    from bigtent.client.tables import Column, now_utc, print_table

    now = now_utc()
    columns = [Column("launch", key=True), Column("pool", key=True)] + [
        Column(c, key=c in ("created", "agent")) for c in ("state", "created", "agent", "error")
    ]
    print_table(
        columns,
        [
            [
                launch.launch_id,
                launch.pool,
                launch.state,
                humanize.relative_iso(launch.created_at, now),
                launch.agent_name or "-",
                launch.error or "",
            ]
            for launch in data.launches
        ],
    )


COMMANDS = (status, agents, builders, launches)
