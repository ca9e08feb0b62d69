"""SQLite on the event loop's thread: the connection SQLAlchemy's aiosqlite dialect is given.

aiosqlite runs every call of a connection on a thread of its own: creating a cursor, the
execute, the fetch, the cursor's close and the commit are each a hand-off (a queue put, the
thread's wake-up, a write to the event loop's self-pipe, a future and its callback). That is
about four hand-offs per statement; in the DAG benchmark they were a quarter of the runner's
CPU per step, for statements that take SQLite microseconds (indexed lookups, small writes).
Here the same calls run where they are made. The URL (``sqlite+aiosqlite:///PATH``), the
dialect, its error classes and everything above it are SQLAlchemy's aiosqlite ones; only the
connection differs (``create_async_engine(async_creator=...)``): a plain ``sqlite3``
connection behind the few awaitable methods the dialect calls (aiosqlite's shape).

What the event loop may now wait for, and why that is bounded:

- *Another process's write lock* (``bigtent cache verify --repair`` beside a runner, a second
  runner on the same file). The connection's busy timeout is 0, so SQLite never sleeps in
  its busy handler on the loop's thread: a statement refused as busy runs again on a worker
  thread with the configured timeout (``BUSY_TIMEOUT_SECS``), the loop serving meanwhile.
  The process's own writers take turns before they write (``sqlitewrites``), so they never
  meet each other's lock.
- *A long statement* runs to its end on the loop's thread. The runner's statements are
  indexed lookups and writes of a few rows; the longest (a collection's selection, a large
  build's admission) are bounded by their batch sizes. A database that outgrows this is one
  for PostgreSQL, whose driver never blocks the loop.
- *A checkpoint of the write-ahead log* at a commit (``synchronous=NORMAL``: the commit
  itself does not wait for the disk; the checkpoint every ~1,000 pages does).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import Any, TypeVar

BUSY_TIMEOUT_SECS = 30.0
"""How long a statement refused as busy waits for another process's write lock (on a worker
thread), as aiosqlite's connections waited (``timeout``)."""

_T = TypeVar("_T")


def is_busy(exc: BaseException) -> bool:
    """Whether SQLite refused because another connection holds the lock (SQLITE_BUSY; not
    ``SQLITE_BUSY_SNAPSHOT``, which no wait can cure: its transaction must start again)."""
    return isinstance(exc, sqlite3.OperationalError) and (
        getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
    )


class _Lockable:
    """A ``sqlite3`` connection's calls: on the calling thread with no busy wait; a call
    refused as busy again on a worker thread, waiting up to the busy timeout."""

    def __init__(self, conn: sqlite3.Connection, busy_timeout_secs: float) -> None:
        self._conn = conn
        self._busy_ms = int(busy_timeout_secs * 1000)

    async def call(self, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
        return await asyncio.to_thread(self._waiting, fn)

    def _waiting(self, fn: Callable[[], _T]) -> _T:
        self._conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        try:
            return fn()
        finally:
            self._conn.execute("PRAGMA busy_timeout = 0")


class InlineCursor:
    """aiosqlite's cursor, as the dialect uses it."""

    def __init__(self, cursor: sqlite3.Cursor, lockable: _Lockable) -> None:
        self._cursor = cursor
        self._lockable = lockable

    async def __aenter__(self) -> InlineCursor:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, sql: str, parameters: Any = None) -> InlineCursor:
        cursor = self._cursor
        if parameters is None:
            await self._lockable.call(lambda: cursor.execute(sql))
        else:
            await self._lockable.call(lambda: cursor.execute(sql, parameters))
        return self

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> InlineCursor:
        rows = list(parameters)  # an iterator is consumed once; a retry needs it again
        cursor = self._cursor
        await self._lockable.call(lambda: cursor.executemany(sql, rows))
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()


class _Ready:
    """An awaitable (and async context manager) already holding its value, as aiosqlite's
    ``connect`` and ``cursor`` return awaitables."""

    def __init__(self, value: InlineCursor) -> None:
        self._value = value

    def __await__(self) -> Generator[Any, None, InlineCursor]:
        yield from ()  # a generator that never suspends
        return self._value

    async def __aenter__(self) -> InlineCursor:
        return self._value

    async def __aexit__(self, *_exc: object) -> None:
        await self._value.close()


class InlineConnection:
    """aiosqlite's connection, as SQLAlchemy's dialect uses it (``_connection`` is what it
    checks before a commit or rollback: None once closed)."""

    def __init__(self, conn: sqlite3.Connection, busy_timeout_secs: float) -> None:
        self._conn = conn
        self._connection: sqlite3.Connection | None = conn
        self._lockable = _Lockable(conn, busy_timeout_secs)

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    def cursor(self) -> _Ready:
        return _Ready(InlineCursor(self._conn.cursor(), self._lockable))

    async def commit(self) -> None:
        await self._lockable.call(self._conn.commit)

    async def rollback(self) -> None:
        self._conn.rollback()

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Close now (SQLAlchemy's forced termination)."""
        if self._connection is not None:
            self._connection = None
            self._conn.close()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)


def connector(
    path: str, busy_timeout_secs: float = BUSY_TIMEOUT_SECS
) -> Callable[[], Awaitable[InlineConnection]]:
    """The ``async_creator`` of an engine on the SQLite file ``path``."""

    async def connect() -> InlineConnection:
        # The pool may hand a connection to another thread's loop (the engine's disposal
        # runs where it is called); the statements of one connection never overlap.
        conn = sqlite3.connect(path, timeout=0, check_same_thread=False)
        return InlineConnection(conn, busy_timeout_secs)

    return connect
