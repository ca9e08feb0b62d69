"""SQLite on the event loop's thread (``inlinesqlite``): the runner's engine for an SQLite file
runs its statements where they are called, with SQLAlchemy's aiosqlite dialect on top; a
statement refused because another process holds the write lock waits on a worker thread,
never on the loop's."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiosqlite
import pytest
import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bigtent.runner.db import inlinesqlite
from bigtent.runner.db.inlinesqlite import InlineConnection, is_busy
from bigtent.runner.db.migrate import create_engine

WAIT_SECS = 10.0


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (x INTEGER PRIMARY KEY, y TEXT)"))
    yield engine
    await engine.dispose()


async def _driver_connection(engine: AsyncEngine) -> object:
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        return raw.driver_connection


async def test_a_file_database_runs_on_the_loop_thread(engine: AsyncEngine) -> None:
    assert isinstance(await _driver_connection(engine), InlineConnection)
    threads = {t.ident for t in threading.enumerate()}
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO t (x, y) VALUES (1, 'a')"))
    # No connection thread was started for it (aiosqlite starts one per connection).
    assert {t.ident for t in threading.enumerate()} <= threads


@pytest.mark.parametrize("tail", [":memory:", "{tmp}/db.sqlite?timeout=5"])
async def test_memory_and_url_options_keep_aiosqlite(tmp_path: Path, tail: str) -> None:
    engine = create_engine("sqlite+aiosqlite:///" + tail.format(tmp=tmp_path))
    try:
        assert isinstance(await _driver_connection(engine), aiosqlite.Connection)
    finally:
        await engine.dispose()


async def test_statements_transactions_and_errors(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        result = await conn.execute(text("INSERT INTO t (x, y) VALUES (1, 'a')"))
        assert result.rowcount == 1
        await conn.execute(
            text("INSERT INTO t (x, y) VALUES (:x, :y)"),
            [{"x": 2, "y": "b"}, {"x": 3, "y": "c"}],  # executemany
        )
    # A rollback undoes; a constraint error is SQLAlchemy's IntegrityError.
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO t (x, y) VALUES (4, 'd')"))
            await conn.execute(text("INSERT INTO t (x, y) VALUES (1, 'again')"))
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT x, y FROM t ORDER BY x"))).all()
        assert [tuple(r) for r in rows] == [(1, "a"), (2, "b"), (3, "c")]
        one = (await conn.execute(text("SELECT y FROM t WHERE x = 2"))).scalar_one()
        assert one == "b"
        stream = await conn.stream(text("SELECT x FROM t ORDER BY x"))  # server-side cursor
        assert [r[0] async for r in stream] == [1, 2, 3]


def _hold_write_lock(path: Path, release: threading.Event, held: threading.Event) -> None:
    """Another connection (as another process would) holds the write lock until released."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO t (x, y) VALUES (100, 'other')")
        held.set()
        release.wait(WAIT_SECS)
        other.execute("COMMIT")
    finally:
        other.close()


async def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_SECS
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_another_processs_lock_is_waited_for_off_the_loop(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    release, held = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(tmp_path / "db.sqlite", release, held))
    holder.start()
    try:
        assert await asyncio.to_thread(held.wait, WAIT_SECS)

        async def write() -> None:
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO t (x, y) VALUES (1, 'ours')"))

        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        ticker = asyncio.create_task(tick())
        writer = asyncio.create_task(write())
        # The write waits for the lock while the loop keeps running other tasks.
        start = ticks
        await _until(lambda: ticks >= start + 20)
        assert not writer.done()
        release.set()
        await asyncio.wait_for(writer, WAIT_SECS)
        ticker.cancel()
    finally:
        release.set()
        holder.join(WAIT_SECS)
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT x FROM t ORDER BY x"))).scalars().all()
    assert rows == [1, 100]


async def test_the_wait_for_another_processs_lock_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{path}", async_creator=inlinesqlite.connector(str(path), 0.2)
    )
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (x INTEGER PRIMARY KEY, y TEXT)"))
    release, held = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(path, release, held))
    holder.start()
    try:
        assert await asyncio.to_thread(held.wait, WAIT_SECS)
        with pytest.raises(sqlalchemy.exc.OperationalError, match="locked"):
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO t (x, y) VALUES (1, 'ours')"))
    finally:
        release.set()
        holder.join(WAIT_SECS)
        await engine.dispose()


def test_is_busy() -> None:
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = sqlite3.SQLITE_BUSY
    snapshot = sqlite3.OperationalError("database is locked")
    snapshot.sqlite_errorcode = sqlite3.SQLITE_BUSY_SNAPSHOT
    assert is_busy(busy)
    assert not is_busy(snapshot)  # no wait cures it: the transaction starts again
    assert not is_busy(sqlite3.OperationalError("no such table: t"))
    assert not is_busy(sqlite3.IntegrityError("UNIQUE constraint failed"))
