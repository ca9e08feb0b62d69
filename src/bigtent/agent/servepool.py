"""The serve executor's processes: two long-lived ``nix-store --serve --write`` per slot.

Each slot keeps a *substituter* (it only ever answers ``cmdQueryValidPaths`` with substitution)
and a *builder* (it only ever runs ``cmdBuildDerivation``): a serve process turns substitution
off for good at its first build (``getBuildSettings`` sets ``useSubstitutes = false``; checked
on Nix 2.8). Processes start lazily, are reused across steps, and are replaced when they die,
after a command was cut short (``command``: the process is killed), or when the slot's store
settings change (the runner announced other caches).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from bigtent.agent.abortable import Interrupted, unless_set
from bigtent.nix.serve import ServeConnection, ServeProtocolError
from bigtent.nix.store import NixStore, RealiseStatus

log = logging.getLogger(__name__)

SERVE_BACKSTOP_SECS = 30
"""A build Nix has not ended this long after its own timeout is killed (``timed_out``)."""
SERVE_CLOSE_SECS = 5
T = TypeVar("T")


class Role(StrEnum):
    """Which of a slot's two serve processes."""

    SUBSTITUTER = "substituter"
    """Only ever substitutes: a serve process stops substituting at its first build."""
    BUILDER = "builder"


class Stopped(Exception):
    """A serve command was cut short (abort, log limit, backstop); its process was killed."""

    def __init__(self, status: RealiseStatus, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


@dataclass(slots=True)
class _Slot:
    """The serve processes of one slot, and the store settings they were started with."""

    key: tuple[object, ...]
    processes: dict[Role, ServeConnection]

    def connections(self) -> list[ServeConnection]:
        return [self.processes[role] for role in Role if role in self.processes]


def _settings_key(store: NixStore) -> tuple[object, ...]:
    return (store.store, tuple(sorted(store.options.items())), tuple(sorted(store.env.items())))


class ServePool:
    """The serve processes of every slot of one agent."""

    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}
        self._stale: set[int] = set()
        """Busy slots whose processes stop when their step ends (``release_idle``)."""

    @property
    def processes(self) -> list[ServeConnection]:
        """The live serve processes (for tests and metrics)."""
        return [c for s in self._slots.values() for c in s.connections() if c.alive]

    async def connection(self, slot: int, store: NixStore, role: Role) -> ServeConnection:
        """The slot's live serve process for ``role``, (re)started if needed; processes
        started with other settings (the runner announced other caches) are replaced."""
        key = _settings_key(store)
        entry = self._slots.get(slot)
        if entry is None or entry.key != key:
            if entry is not None:
                await _close(entry.connections())
            entry = self._slots[slot] = _Slot(key, {})
        old = entry.processes.get(role)
        if old is not None and old.alive:
            return old
        if old is not None:
            await old.wait_closed()
        proc, stderr_fd = await store.spawn_serve()
        conn = ServeConnection(proc, stderr_fd)
        entry.processes[role] = conn
        try:
            await asyncio.wait_for(conn.handshake(), SERVE_CLOSE_SECS * 6)
        except (TimeoutError, ServeProtocolError) as exc:
            conn.kill()
            await conn.wait_closed()
            if isinstance(exc, TimeoutError):
                raise ServeProtocolError("nix-store --serve did not answer its handshake") from exc
            raise
        log.debug("slot %d: started %s (serve protocol %#x)", slot, role, conn.server_version)
        return conn

    async def release_idle(self, busy: Collection[int]) -> None:
        """Stop the processes of the slots not in ``busy``, so that their temporary GC roots
        (every path they ever substituted or built) stop holding paths (before a
        collection). Busy slots' processes stop when their step ends (``step_ended``)."""
        self._stale.update(s for s in self._slots if s in busy)
        await self._close_slots([slot for slot in self._slots if slot not in busy])

    async def step_ended(self, slot: int) -> None:
        """The step of ``slot`` ended: stop its processes if a release asked for it."""
        if slot in self._stale:
            self._stale.discard(slot)
            await self._close_slots([slot])

    async def aclose(self) -> None:
        """Stop every serve process (the agent is exiting)."""
        slots, self._slots = list(self._slots.values()), {}
        await _close([c for s in slots for c in s.connections()])

    async def _close_slots(self, slots: list[int]) -> None:
        entries = [self._slots.pop(slot) for slot in slots if slot in self._slots]
        await _close([c for e in entries for c in e.connections()])


async def _close(connections: list[ServeConnection]) -> None:
    for conn in connections:
        await conn.close(SERVE_CLOSE_SECS)


async def command(
    conn: ServeConnection,
    op: Awaitable[T],
    on_line: Callable[[str], Awaitable[None] | None],
    abort: asyncio.Event,
    log_limit: asyncio.Event,
    backstop: float | None = None,
) -> T:
    """Run one serve command with its log going to ``on_line``; an abort, the log limit or
    the backstop kills the process (it is restarted for the next step) and raises
    ``Stopped``."""
    conn.sink = on_line
    try:
        value = await unless_set(op, abort, log_limit, timeout=backstop)
        conn.drain_log()
        return value
    except Interrupted as stop:
        conn.kill()
        if stop.by is abort:
            raise Stopped(RealiseStatus.ABORTED, "aborted") from None
        if stop.by is log_limit:
            raise Stopped(
                RealiseStatus.LOG_LIMIT, "error: the build log exceeded its limit"
            ) from None
        raise Stopped(
            RealiseStatus.TIMED_OUT,
            f"error: the build did not end {SERVE_BACKSTOP_SECS} s after its timeout",
        ) from None
    finally:
        conn.sink = None
        if not conn.alive:
            await conn.wait_closed()
