"""The runner's database schema: ``bigtent db status`` and ``bigtent db migrate``."""

from __future__ import annotations

from pathlib import Path

import click

from bigtent.cli.options import CONTEXT, config_option, json_option, run
from bigtent.cli.output import emit
from bigtent.config import load_runner_config

RUNNER_CONFIG = config_option(
    "runner.toml naming the database (keys overridable by BIGTENT_<SECTION>__<KEY>)."
)
"""``--config`` of the commands that open the runner's database themselves."""


@click.group(context_settings=CONTEXT)
def db() -> None:
    """The runner's database schema ([database] url in runner.toml)."""


@db.command("status", context_settings=CONTEXT)
@RUNNER_CONFIG
@json_option
@click.pass_context
def db_status(ctx: click.Context, config_path: Path | None, as_json: bool) -> None:
    """Show the schema revision of the database and what `db migrate` would apply.

    Exits 0 when the runner can start on it, 1 when it needs `bigtent db migrate` (or a newer
    bigtent)."""
    from bigtent.runner.db.migrate import SchemaState, display_url, inspect_database

    url = load_runner_config(config_path).database_url()
    report = run(inspect_database(url))

    def human() -> None:
        click.echo(f"database: {display_url(url)}")
        click.echo(f"schema:   {report.current or '(none)'} (this bigtent: {report.head})")
        what = {
            SchemaState.CURRENT: "up to date",
            SchemaState.EMPTY: "empty: `bigtent db migrate` creates the schema",
            SchemaState.BEHIND: f"behind: `bigtent db migrate` applies {', '.join(report.pending)}",
            SchemaState.AHEAD: "newer than this bigtent: run the bigtent that migrated it",
        }[report.state]
        click.echo(f"state:    {what}")

    data = {
        "database": display_url(url),
        "state": report.state,
        "current": report.current,
        "head": report.head,
        "pending": list(report.pending),
    }
    emit(as_json, data, human)
    ctx.exit(0 if report.state is SchemaState.CURRENT else 1)


@db.command("migrate", context_settings=CONTEXT)
@RUNNER_CONFIG
@json_option
def db_migrate(config_path: Path | None, as_json: bool) -> None:
    """Create or upgrade the database schema to this bigtent's (never downgrades).

    Stop the runners first: they refuse to start on a schema other than their own."""
    from bigtent.runner.db.migrate import display_url, migrate_database

    url = load_runner_config(config_path).database_url()
    before, after = run(migrate_database(url))
    if before == after:
        line = f"{display_url(url)}: schema already at {after}; nothing to do"
    elif before is None:
        line = f"{display_url(url)}: schema created at {after}"
    else:
        line = f"{display_url(url)}: schema migrated from {before} to {after}"
    emit(as_json, {"database": display_url(url), "before": before, "after": after}, line)


COMMANDS = (db,)
