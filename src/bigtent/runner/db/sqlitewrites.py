"""SQLite writers take turns in the runner's process instead of in SQLite's busy handler.

SQLite lets one connection write at a time. A second writer gets SQLITE_BUSY and its busy
handler polls with sleeps of 1, 2, 5, 10, 15, 20, 25 ms...: under the runner's usual load
(agents' output uploads, results and dispatch, each in its own transaction on its own
pooled connection) about a third of the writes collided, and each lost the rest of its sleep
after the other had committed. Here a connection about to write first waits on one asyncio
lock per event loop, held until its transaction commits or rolls back, so the next writer
starts the moment the previous one is done. Readers never wait (WAL lets them read beside
the writer). A writer that waits longer than ``WAIT_SECS`` goes ahead anyway and SQLite's
busy timeout decides, as without the lock.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util.concurrency import await_only, in_greenlet

WAIT_SECS = 30.0
"""How long a writer waits for its turn before it goes ahead (SQLite's busy timeout)."""

_WRITES = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER"})


def is_write(statement: str) -> bool:
    """Whether a statement writes, by its first keyword (pure): ``INSERT``, ``UPDATE``,
    ``DELETE``, ``REPLACE`` or DDL. ``SELECT``, ``PRAGMA`` and ``WITH ... SELECT`` do not."""
    words = statement.lstrip(" \t\r\n(").split(None, 1)
    return bool(words) and words[0].upper() in _WRITES


class WriteTurns:
    """The turns of one engine's writers: a lock per event loop, and which DBAPI connection
    holds it."""

    def __init__(self) -> None:
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._holders: dict[int, asyncio.Lock] = {}

    @staticmethod
    def _key(connection: object) -> int:
        """The DBAPI connection's identity, whether given itself or the pool's proxy of it
        (the dialect's commit and rollback get the proxy)."""
        return id(getattr(connection, "dbapi_connection", None) or connection)

    def held(self, connection: object) -> bool:
        return self._key(connection) in self._holders

    def taken(self) -> bool:
        """Whether some writer holds its turn now."""
        return bool(self._holders)

    def take(self, connection: object) -> None:
        """Wait for the turn (inside SQLAlchemy's greenlet: the event loop runs meanwhile)."""
        if self.held(connection) or not in_greenlet():
            return
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        if await_only(_acquire(lock)):
            self._holders[self._key(connection)] = lock

    def give_back(self, connection: object) -> None:
        lock = self._holders.pop(self._key(connection), None)
        if lock is not None:
            lock.release()


async def _acquire(lock: asyncio.Lock) -> bool:
    """Take ``lock`` within ``WAIT_SECS`` (False: not taken; SQLite's busy timeout decides).
    ``asyncio.timeout``, not ``wait_for``: a cancellation as the lock is granted must not
    leave it taken."""
    try:
        async with asyncio.timeout(WAIT_SECS):
            await lock.acquire()
    except TimeoutError:
        return False
    return True


def take_turns(engine: AsyncEngine) -> WriteTurns:
    """Make ``engine``'s writers (an SQLite engine's) take turns: the lock is taken before a
    transaction's first write and given back once its COMMIT or ROLLBACK has run."""
    turns = WriteTurns()
    sync_engine = engine.sync_engine
    _TURNS[sync_engine] = turns

    @event.listens_for(sync_engine, "before_cursor_execute")
    def _before(
        conn: Connection, _cursor: Any, statement: str, *_args: Any, **_kwargs: Any
    ) -> None:
        if is_write(statement):
            turns.take(conn.connection)

    for name in ("do_commit", "do_rollback", "do_close", "do_terminate"):
        _after(sync_engine.dialect, name, turns)

    # However a connection leaves its user (returned, invalidated, detached, closed), its
    # turn goes with it: a turn must never outlive its transaction.
    def _gone(dbapi_connection: Any, *_args: Any) -> None:
        turns.give_back(dbapi_connection)

    for name in ("checkin", "invalidate", "soft_invalidate", "close", "detach", "close_detached"):
        event.listen(sync_engine.pool, name, _gone)
    return turns


_TURNS: weakref.WeakKeyDictionary[Engine, WriteTurns] = weakref.WeakKeyDictionary()


def turns_of(engine: AsyncEngine) -> WriteTurns | None:
    """The turns ``take_turns`` gave ``engine``'s writers (None: it did not)."""
    return _TURNS.get(engine.sync_engine)


def _after(dialect: Dialect, name: str, turns: WriteTurns) -> None:
    """Wrap the dialect's ``name`` (commit, rollback, close of a DBAPI connection) so the
    turn is given back once it ran, or failed."""
    original = getattr(dialect, name)

    def wrapped(dbapi_connection: Any) -> None:
        try:
            original(dbapi_connection)
        finally:
            turns.give_back(dbapi_connection)

    setattr(dialect, name, wrapped)
