"""The runner refuses a database whose schema is not its own; ``bigtent db migrate`` and
``bigtent db status`` (through the real entry point) create, upgrade and report it. On the test
database: SQLite, or PostgreSQL in that pass."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Connection, text

from bigtent.config import load_runner_config
from bigtent.errors import DatabaseError, SchemaMismatch
from bigtent.nix.keys import generate_key
from bigtent.runner.components import build_components, close_components
from bigtent.runner.db.migrate import alembic_config, create_engine, schema_status
from tests.databases import MakeDatabase
from tests.unit.cli.helpers import run_cli

run = run_cli


def _config(tmp_path: Path, url: str) -> Path:
    key = tmp_path / "cache.sk"
    key.write_text(generate_key("t-1").to_text())
    path = tmp_path / "runner.toml"
    path.write_text(
        f'[runner]\nlisten = "127.0.0.1:0"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[database]\nurl = "{url}"\n[cache]\nsigning_key_file = "{key}"\n'
    )
    return path


async def _set_revision(url: str, revision: str, *, stamp_only: bool = False) -> None:
    def go(conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        if stamp_only:
            conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
        else:
            command.upgrade(cfg, revision)

    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(go)
    finally:
        await engine.dispose()


def _in_thread(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to completion from a synchronous test (the CLI runs its own loop)."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()


async def _start(tmp_path: Path, url: str) -> None:
    comps = await build_components(load_runner_config(_config(tmp_path, url)))
    await close_components(comps)


async def test_the_runner_refuses_an_empty_database(
    tmp_path: Path, make_database: MakeDatabase
) -> None:
    url = make_database(migrated=False)
    with pytest.raises(SchemaMismatch, match="has no bigtent schema yet") as err:
        await _start(tmp_path, url)
    assert "bigtent db migrate --config" in err.value.message
    engine = create_engine(url)
    try:
        assert (await schema_status(engine))[0] is None  # it created nothing
    finally:
        await engine.dispose()


async def test_the_runner_refuses_an_older_schema(
    tmp_path: Path, make_database: MakeDatabase
) -> None:
    url = make_database(migrated=False)
    await _set_revision(url, "0004")
    with pytest.raises(SchemaMismatch, match="at schema revision 0004") as err:
        await _start(tmp_path, url)
    assert "bigtent db migrate" in err.value.message


async def test_the_runner_refuses_a_newer_schema(
    tmp_path: Path, make_database: MakeDatabase
) -> None:
    url = make_database()
    await _set_revision(url, "9999", stamp_only=True)
    with pytest.raises(SchemaMismatch, match="9999, which this bigtent does not know"):
        await _start(tmp_path, url)


async def test_the_runner_starts_on_a_current_schema(
    tmp_path: Path, make_database: MakeDatabase
) -> None:
    await _start(tmp_path, make_database())


async def test_an_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    url = "postgresql+asyncpg://bigtent:s3cret@127.0.0.1:1/bigtent"
    with pytest.raises(DatabaseError, match="cannot use the database") as err:
        await _start(tmp_path, url)
    assert "s3cret" not in err.value.message and "***" in err.value.message


def test_runner_command_on_an_unmigrated_database_says_what_to_do(
    tmp_path: Path, make_database: MakeDatabase
) -> None:
    result = run(["runner", "--config", str(_config(tmp_path, make_database(migrated=False)))])
    assert result.exit_code == 5
    assert "Error: the database" in result.stderr
    assert "bigtent db migrate --config" in result.stderr
    assert "Traceback" not in result.output


def test_db_status_and_migrate(tmp_path: Path, make_database: MakeDatabase) -> None:
    config = str(_config(tmp_path, make_database(migrated=False)))
    empty = run(["db", "status", "--config", config, "--json"])
    assert empty.exit_code == 1, empty.output
    report = json.loads(empty.stdout)
    assert report["state"] == "empty" and report["current"] is None
    assert report["pending"][0] == "0001" and report["pending"][-1] == report["head"]

    human = run(["db", "status", "--config", config])
    assert human.exit_code == 1
    assert "empty: `bigtent db migrate` creates the schema" in human.stdout

    created = run(["db", "migrate", "--config", config, "--json"])
    assert created.exit_code == 0, created.output
    assert json.loads(created.stdout) | {"database": ""} == {
        "database": "",
        "before": None,
        "after": report["head"],
    }

    again = run(["db", "migrate", "--config", config])
    assert again.exit_code == 0
    assert f"schema already at {report['head']}; nothing to do" in again.stdout

    current = run(["db", "status", "--config", config])
    assert current.exit_code == 0, current.output
    assert "up to date" in current.stdout


def test_db_migrate_upgrades_an_older_schema(tmp_path: Path, make_database: MakeDatabase) -> None:
    url = make_database(migrated=False)
    _in_thread(_set_revision(url, "0003"))
    config = str(_config(tmp_path, url))
    behind = run(["db", "status", "--config", config, "--json"])
    assert behind.exit_code == 1
    assert json.loads(behind.stdout)["state"] == "behind"
    assert json.loads(behind.stdout)["pending"][:2] == ["0004", "0005"]
    migrated = run(["db", "migrate", "--config", config])
    assert migrated.exit_code == 0, migrated.output
    assert "schema migrated from 0003 to" in migrated.stdout
    _in_thread(_start(tmp_path, url))


def test_db_migrate_never_downgrades_a_newer_schema(
    tmp_path: Path, make_database: MakeDatabase
) -> None:
    url = make_database()
    _in_thread(_set_revision(url, "9999", stamp_only=True))
    config = str(_config(tmp_path, url))
    result = run(["db", "migrate", "--config", config])
    assert result.exit_code == 5
    assert "9999, which this bigtent does not know" in result.stderr
    status = run(["db", "status", "--config", config, "--json"])
    assert status.exit_code == 1 and json.loads(status.stdout)["state"] == "ahead"


def test_db_commands_on_an_unreachable_database(tmp_path: Path) -> None:
    config = str(_config(tmp_path, "postgresql+asyncpg://u:s3cret@127.0.0.1:1/x"))
    for args in (["db", "status"], ["db", "migrate"]):
        result = run([*args, "--config", config])
        assert result.exit_code == 5, result.output
        assert result.stderr.startswith(
            "Error: cannot use the database postgresql+asyncpg://u:***@"
        )
        assert "s3cret" not in result.output and "Traceback" not in result.output
