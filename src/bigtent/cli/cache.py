"""The runner's binary cache: ``bigtent cache verify`` (every NAR file checked, run next to
the database), and retention through the API (docs/cache.md): ``bigtent pin add|list|remove``
and ``bigtent gc``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from bigtent.cli.db import RUNNER_CONFIG
from bigtent.cli.options import CONTEXT, ClientOptions, client_options, json_option, run
from bigtent.cli.output import console, emit
from bigtent.config import load_runner_config
from bigtent.errors import UsageError

if TYPE_CHECKING:
    from bigtent.client.models import PinInfo


@click.group("cache", context_settings=CONTEXT)
def cache_group() -> None:
    """The runner's binary cache ([cache] in runner.toml)."""


@cache_group.command("verify", context_settings=CONTEXT)
@RUNNER_CONFIG
@click.option(
    "--repair",
    is_flag=True,
    help="Forget the paths whose NAR file is missing or bad (and delete bad files), so they "
    "are built or uploaded again.",
)
@json_option
@click.pass_context
def cache_verify(ctx: click.Context, config_path: Path | None, repair: bool, as_json: bool) -> None:
    """Check every narinfo's NAR file in the storage: there, of its size, of its hash.

    Exits 0 when every file is good (or, with --repair, every bad path was forgotten), 1 when
    some are bad. Safe while runners run; a runner may still serve a damaged file's narinfo
    it remembers until the next lookup finds the file deleted."""
    from bigtent.runner.cache.verify import cache_tables, verify_cache
    from bigtent.runner.components import open_storage
    from bigtent.runner.db.migrate import DATABASE_ERRORS, create_engine, database_unavailable

    config = load_runner_config(config_path)

    async def go() -> Any:
        engine = create_engine(config.database_url())
        try:
            storage = await open_storage(config)
            return await verify_cache(engine, storage, cache_tables(), repair=repair)
        except DATABASE_ERRORS as exc:
            failure = database_unavailable(exc)
            if failure is None:
                raise
            raise failure from exc
        finally:
            await engine.dispose()

    report = run(go())

    def human() -> None:
        for bad in report.bad:
            click.echo(f"bad: {bad.path} ({bad.cache} cache): {bad.reason}")
        tail = f"; {report.forgotten} forgotten" if repair else ""
        click.echo(f"checked {report.checked} path(s): {len(report.bad)} bad{tail}")

    emit(as_json, report.as_json(), human)
    ctx.exit(0 if not report.bad or (repair and report.forgotten == len(report.bad)) else 1)


# ---- retention: pins and collection ----------------------------------------------------------


def _bytes_text(n: int | None) -> str:
    """``n`` bytes for people: ``512 B``, ``1.5 KiB`` ... ``2.0 TiB``; ``-`` when unknown."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _store_path_arg(text: str) -> str:
    """A store path, or a local link to one (``./result``) resolved to it."""
    if text.startswith("/nix/store/"):
        return text
    resolved = os.path.realpath(text)
    if not resolved.startswith("/nix/store/"):
        raise UsageError(f"{text} is not a store path (nor a link to one)")
    return resolved


@click.group(context_settings=CONTEXT)
def pin() -> None:
    """Named pins: each keeps its paths' closures in the runner's cache."""


@pin.command("add", context_settings=CONTEXT)
@click.argument("name")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option(
    "--keep-days",
    type=click.FloatRange(min=0, min_open=True, max=36500),
    help="Expire the pin after this many days [default: never].",
)
@client_options
@json_option
def pin_add(
    name: str, paths: tuple[str, ...], keep_days: float | None, runner: ClientOptions, as_json: bool
) -> None:
    """Pin PATHs (store paths or links to them) as NAME, replacing an existing pin NAME
    (admin token)."""
    wanted = [_store_path_arg(p) for p in paths]
    got = runner.call(lambda c: c.add_pin(name, wanted, keep_days))
    emit(as_json, got, lambda: _print_pinned(got))


def _print_pinned(got: PinInfo) -> None:
    until = f" until {got.expires_at}" if got.expires_at else ""
    click.echo(f"pinned {len(got.paths)} path(s) as {got.name}{until}")
    for missing in got.missing:
        click.echo(f"not in the cache (yet): {missing}", err=True)


@pin.command("list", context_settings=CONTEXT)
@client_options
@json_option
def pin_list(runner: ClientOptions, as_json: bool) -> None:
    """List the pins."""
    rows = runner.call(lambda c: c.fetch_pins())
    listed = [p.model_dump(mode="json", exclude={"missing"}) for p in rows]
    emit(as_json, listed, lambda: _print_pins(rows))


def _print_pins(rows: list[PinInfo]) -> None:
    table = Table()
    for col in ("name", "paths", "created by", "created", "expires"):
        table.add_column(col)
    for p in rows:
        table.add_row(
            p.name,
            "\n".join(p.paths),
            p.created_by or "-",
            p.created_at or "-",
            p.expires_at or "never",
        )
    console().print(table)


@pin.command("remove", context_settings=CONTEXT)
@click.argument("name")
@client_options
@json_option
def pin_remove(name: str, runner: ClientOptions, as_json: bool) -> None:
    """Remove pin NAME: its paths are collected like any others (admin token)."""
    runner.call(lambda c: c.remove_pin(name))
    emit(as_json, {"removed": name}, f"removed pin {name}")


@click.command("gc", context_settings=CONTEXT)
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@client_options
@json_option
def gc_cmd(dry_run: bool, runner: ClientOptions, as_json: bool) -> None:
    """Collect the runner's caches now: delete what no root keeps and nobody used within
    max_idle_days, and evict down to the quota (admin token)."""
    report = runner.call(lambda c: c.collect_garbage(dry_run=dry_run))
    emit(as_json, report, lambda: _print_collection(report, dry_run))


def _print_collection(report: dict[str, Any], dry_run: bool) -> None:
    verb = "would delete" if dry_run else "deleted"
    for name, part in report.get("caches", {}).items():
        for entry in part.get("paths", []):
            click.echo(f"{verb}: {entry['path']} ({name} cache, {entry['reason']})")
        if part.get("more_paths"):
            click.echo(f"... and {part['more_paths']} more in the {name} cache")
    for name, part in report.get("caches", {}).items():
        reasons = ", ".join(f"{n} {r}" for r, n in part.get("deleted_by_reason", {}).items())
        click.echo(
            f"{name} cache: {verb} {part.get('deleted', 0)} of {part.get('paths_before', 0)} "
            f"path(s) ({reasons}), {_bytes_text(part.get('bytes_freed'))} freed, "
            f"{_bytes_text(part.get('bytes_after'))} kept"
            + (", over quota with rooted paths alone" if part.get("over_quota") else "")
        )


COMMANDS = (cache_group, pin, gc_cmd)
