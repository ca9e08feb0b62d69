"""SQLite writers take turns in the process: a second writer waits for the first one's
COMMIT or ROLLBACK on an asyncio lock, never in SQLite's busy handler; readers never wait."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bigtent.runner.db.migrate import create_engine
from bigtent.runner.db.sqlitewrites import WriteTurns, is_write, take_turns, turns_of

WAIT_SECS = 10


@pytest.mark.parametrize(
    ("statement", "writes"),
    [
        ("INSERT INTO t (x) VALUES (?)", True),
        ("  update t SET x = 1", True),
        ("\nDELETE FROM t", True),
        ("REPLACE INTO t VALUES (1)", True),
        ("CREATE TABLE t (x INTEGER)", True),
        ("DROP TABLE t", True),
        ("ALTER TABLE t ADD y", True),
        ("SELECT x FROM t", False),
        ("(SELECT 1) UNION (SELECT 2)", False),
        ("WITH a AS (SELECT 1) SELECT * FROM a", False),
        ("PRAGMA journal_mode=WAL", False),
        ("", False),
        ("   ", False),
    ],
)
def test_is_write(statement: str, writes: bool) -> None:
    assert is_write(statement) is writes


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[tuple[AsyncEngine, WriteTurns]]:
    """An SQLite engine whose busy timeout is zero: a writer that met another one in SQLite
    would fail at once with "database is locked"."""
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", connect_args={"timeout": 0}
    )
    async with engine.begin() as conn:
        await conn.execute(text("PRAGMA journal_mode=WAL"))
        await conn.execute(text("CREATE TABLE t (x INTEGER)"))
    turns = take_turns(engine)
    yield engine, turns
    await engine.dispose()


async def _count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM t"))).scalar_one())


async def test_a_second_writer_waits_for_the_first_ones_commit(
    engine: tuple[AsyncEngine, WriteTurns],
) -> None:
    eng, _turns = engine
    first_wrote, let_first_commit = asyncio.Event(), asyncio.Event()
    order: list[str] = []

    async def first() -> None:
        async with eng.begin() as conn:
            await conn.execute(text("INSERT INTO t (x) VALUES (1)"))
            first_wrote.set()
            await let_first_commit.wait()
            order.append("first commits")

    async def second() -> None:
        await first_wrote.wait()
        async with eng.begin() as conn:
            await conn.execute(text("INSERT INTO t (x) VALUES (2)"))
            order.append("second wrote")

    async with asyncio.timeout(WAIT_SECS):
        tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
        await first_wrote.wait()
        # The first holds its turn: a reader still reads (WAL), the second writer waits.
        assert await _count(eng) == 0
        for _ in range(20):
            await asyncio.sleep(0)
        assert order == [] and not tasks[1].done()
        let_first_commit.set()
        await asyncio.gather(*tasks)
    assert order == ["first commits", "second wrote"]
    assert await _count(eng) == 2


@pytest.mark.parametrize("how", ["rollback", "error", "close", "invalidate"])
async def test_the_turn_is_given_back_when_a_writer_does_not_commit(
    engine: tuple[AsyncEngine, WriteTurns], how: str
) -> None:
    eng, turns = engine
    if how == "error":
        with pytest.raises(RuntimeError):
            async with eng.begin() as conn:
                await conn.execute(text("INSERT INTO t (x) VALUES (1)"))
                raise RuntimeError("boom")
    else:
        async with eng.connect() as conn:
            await conn.execute(text("INSERT INTO t (x) VALUES (1)"))
            assert turns.held(conn.sync_connection.connection)  # type: ignore[union-attr]
            if how == "rollback":
                await conn.rollback()
            elif how == "invalidate":  # the connection is thrown away, not returned
                await conn.invalidate()
    async with asyncio.timeout(WAIT_SECS):
        async with eng.begin() as conn:
            await conn.execute(text("INSERT INTO t (x) VALUES (2)"))
    assert await _count(eng) == 1


async def test_readers_take_no_turn(engine: tuple[AsyncEngine, WriteTurns]) -> None:
    eng, turns = engine
    async with eng.connect() as conn:
        await conn.execute(text("SELECT count(*) FROM t"))
        assert not turns.held(conn.sync_connection.connection)  # type: ignore[union-attr]


async def test_the_runner_s_sqlite_engine_takes_turns(tmp_path: Path) -> None:
    eng = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'runner.sqlite'}")
    turns = turns_of(eng)
    assert turns is not None
    try:
        async with eng.begin() as conn:
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))
            assert turns.taken()
        assert not turns.taken()
    finally:
        await eng.dispose()


def test_postgresql_engines_take_no_turns() -> None:
    assert turns_of(create_engine("postgresql+asyncpg://u@127.0.0.1/db")) is None
