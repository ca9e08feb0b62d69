"""How runners sharing one PostgreSQL database tell each other what they changed.

Every scheduler transaction that changes steps or builds ends with ``NOTIFY`` on one channel,
its payload naming the runner and the ids it changed; PostgreSQL delivers it only if the
transaction commits, and after it did. Every runner ``LISTEN``s on a connection of its own,
ignores its own notifications and re-reads the rows the others name (docs/architecture.md,
"Several runners"). The payload holds ids only, never states: the receiver always reads the
rows as they are now, so a late or duplicated notification is harmless.

SQLite has one runner per database: ``LocalFeed`` publishes nothing and hears nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bigtent.backoff import Backoff

log = logging.getLogger(__name__)

CHANNEL = "bigtent_changes"
MAX_PAYLOAD_BYTES = 7900
"""PostgreSQL refuses payloads of 8000 bytes or more; larger changes go out in pieces."""
PING_SECS = 15.0
"""How often the listening connection is checked (a silently dead one hears nothing)."""
RECONNECT_BACKOFF = Backoff(base=0.5, cap=30.0)
"""Delays between attempts to LISTEN again after the connection failed."""
_CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})
"""serialization_failure, deadlock_detected: another runner's transaction won."""

_PENDING_KEY = "bigtent.changes"


# ---- what changed (pure) -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Change:
    """Rows another runner changed: step ids, build ids, and whether stored tokens did."""

    origin: str
    steps: frozenset[int] = frozenset()
    builds: frozenset[int] = frozenset()
    tokens: bool = False


def encode(change: Change, limit: int = MAX_PAYLOAD_BYTES) -> list[str]:
    """``change`` as NOTIFY payloads of at most ``limit`` bytes each (ids split across
    several when needed; each payload stands alone)."""
    head = {"o": change.origin}
    if change.tokens:
        head["t"] = 1  # type: ignore[assignment]
    budget = limit - len(json.dumps({**head, "s": [], "b": []}, separators=(",", ":")))
    if budget < 32:
        raise ValueError(f"payload limit {limit} is too small")
    out: list[str] = []
    items = [("s", i) for i in sorted(change.steps)] + [("b", i) for i in sorted(change.builds)]
    chunk: dict[str, list[int]] = {"s": [], "b": []}
    used = 0
    for key, item in items:
        size = len(str(item)) + 1
        if used + size > budget:
            out.append(_payload(head, chunk))
            chunk, used = {"s": [], "b": []}, 0
        chunk[key].append(item)
        used += size
    if used or not out:
        out.append(_payload(head, chunk))
    return out


def _payload(head: dict[str, Any], chunk: dict[str, list[int]]) -> str:
    body = {**head, **{k: v for k, v in chunk.items() if v}}
    return json.dumps(body, separators=(",", ":"))


def decode(payload: str) -> Change | None:
    """A payload back as a Change; None when it is not one of ours (ignored, logged)."""
    try:
        data = json.loads(payload)
        origin = data["o"]
        steps = data.get("s", [])
        builds = data.get("b", [])
        if not isinstance(origin, str) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in [*steps, *builds]
        ):
            return None
        return Change(origin, frozenset(steps), frozenset(builds), bool(data.get("t")))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def is_conflict(exc: BaseException) -> bool:
    """A deadlock or serialization failure: the database picked this transaction to lose to
    another runner's; doing it again (after re-reading) is the remedy."""
    if not isinstance(exc, DBAPIError):
        return False
    for candidate in (exc.orig, getattr(exc.orig, "__cause__", None)):
        if getattr(candidate, "sqlstate", None) in _CONFLICT_SQLSTATES:
            return True
    return False


# ---- recording changes inside a transaction ---------------------------------------------------
def note_steps(conn: AsyncConnection, ids: Iterable[int]) -> None:
    """Remember that this transaction changed these steps (``queries`` calls this)."""
    _pending(conn)["s"].update(int(i) for i in ids)


def note_builds(conn: AsyncConnection, ids: Iterable[int]) -> None:
    _pending(conn)["b"].update(int(i) for i in ids)


def note_tokens(conn: AsyncConnection) -> None:
    _pending(conn)["t"].add(1)


def _pending(conn: AsyncConnection) -> dict[str, set[int]]:
    info = conn.info
    pending = info.get(_PENDING_KEY)
    if pending is None:
        pending = info[_PENDING_KEY] = {"s": set(), "b": set(), "t": set()}
    return pending


def take_pending(conn: AsyncConnection, origin: str) -> Change | None:
    """What this transaction noted so far (and forget it): the connection's info lives as
    long as the pooled connection, so every transaction starts and ends by taking it."""
    pending = conn.info.pop(_PENDING_KEY, None)
    if not pending or not any(pending.values()):
        return None
    return Change(origin, frozenset(pending["s"]), frozenset(pending["b"]), bool(pending["t"]))


# ---- the feeds -------------------------------------------------------------------------------
OnChange = Callable[[Change | None], Awaitable[None]]
"""Called with each change another runner made, and with None after (re)connecting: changes
may have been missed, everything must be read again."""


class ChangeFeed(Protocol):
    origin: str
    shared: bool
    """True when other runners may write the same database."""

    async def publish(self, conn: AsyncConnection) -> None:
        """Announce what ``conn``'s transaction noted, when it commits."""

    async def follow(self, on_change: OnChange) -> None:
        """Hear the other runners' changes until cancelled."""


class LocalFeed:
    """SQLite: one runner per database, nothing to tell or hear."""

    shared = False

    def __init__(self) -> None:
        self.origin = "local"

    async def publish(self, conn: AsyncConnection) -> None:
        conn.info.pop(_PENDING_KEY, None)

    async def follow(self, on_change: OnChange) -> None:
        await asyncio.Event().wait()


class PgChangeFeed:
    """PostgreSQL LISTEN/NOTIFY on ``CHANNEL``, through one connection of the engine's that
    it keeps (and closes, not returns, when done)."""

    shared = True

    def __init__(self, engine: AsyncEngine, *, ping_secs: float = PING_SECS) -> None:
        self.engine = engine
        self.origin = f"runner-{secrets.token_hex(6)}"
        self.ping_secs = ping_secs
        self.connected = asyncio.Event()
        """Set while LISTENing (tests wait on it)."""
        self.backend_pid: int | None = None
        """The server process of the listening connection, while there is one."""

    async def publish(self, conn: AsyncConnection) -> None:
        change = take_pending(conn, self.origin)
        if change is None:
            return
        for payload in encode(change):
            await conn.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": CHANNEL, "payload": payload},
            )

    async def follow(self, on_change: OnChange) -> None:
        failures = 0
        while True:
            delay = RECONNECT_BACKOFF.delay(failures)
            try:
                await self._listen(on_change)
                failures, delay = 0, RECONNECT_BACKOFF.delay(0)
            except (OSError, SQLAlchemyError, TimeoutError) as exc:
                log.warning(
                    "listening for other runners' changes failed (%s); again in %.1f s",
                    exc,
                    delay,
                )
            except Exception:
                # The driver's own errors, or a failure handling a change: the supervisor
                # logs it and starts over (a reconnect reloads everything).
                log.exception("listening for other runners' changes failed; again in %.1f s", delay)
            finally:
                self.connected.clear()
                self.backend_pid = None
            await asyncio.sleep(delay)
            failures += 1

    async def _listen(self, on_change: OnChange) -> None:
        """One LISTEN session: until the connection dies (then the caller reconnects)."""
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        conn = await self.engine.connect()
        try:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection

            def heard(_conn: object, _pid: int, _channel: str, payload: str) -> None:
                queue.put_nowait(payload)

            def ended(_conn: object) -> None:
                queue.put_nowait(None)

            driver.add_termination_listener(ended)
            await driver.add_listener(CHANNEL, heard)
            self.backend_pid = int(driver.get_server_pid())
            self.connected.set()
            log.info("listening for other runners' changes (%s)", self.origin)
            # Anything committed before LISTEN took effect was not heard.
            await on_change(None)
            while True:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
                # cancellation that arrives as a notice does, and the feed never stops.
                try:
                    async with asyncio.timeout(self.ping_secs):
                        payload = await queue.get()
                except TimeoutError:
                    async with asyncio.timeout(self.ping_secs):
                        await driver.execute("SELECT 1")
                    continue
                if payload is None:
                    raise OSError("the listening connection was closed")
                change = decode(payload)
                if change is None:
                    log.warning("ignoring a malformed change notice: %.200r", payload)
                elif change.origin != self.origin:
                    await on_change(change)
        finally:
            # Never back into the pool with a listener attached.
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()


def make_feed(engine: AsyncEngine) -> ChangeFeed:
    """The feed for the engine's database."""
    if engine.dialect.name == "postgresql":
        return PgChangeFeed(engine)
    return LocalFeed()
