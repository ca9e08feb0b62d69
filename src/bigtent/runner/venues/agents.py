"""Agent records: which stale ephemeral rows to prune (pure) and the periodic prune task.

architecture §4: the runner stores every agent session and prunes stale ephemeral rows, connected or
not (a runner that was killed never marked them disconnected), once their last_seen is older
than ``scheduler.ephemeral_session_ttl_secs``. Persistent rows are never pruned; step history
keeps the agent's name in ``steps.agent_name``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.runner.db import queries

log = logging.getLogger(__name__)

MAX_PRUNE_INTERVAL_SECS = 300.0


class AgentRecord(Protocol):
    """What the pruning decision reads of an ``agents`` row."""

    @property
    def machine_id(self) -> str: ...
    @property
    def ephemeral(self) -> bool: ...
    @property
    def last_seen(self) -> float: ...


def stale_agents(rows: Iterable[AgentRecord], now: float, ttl_secs: float) -> list[str]:
    """Machine ids of the ephemeral rows last seen more than ``ttl_secs`` before ``now``,
    whatever their ``connected`` flag says; persistent rows never."""
    return sorted(r.machine_id for r in rows if r.ephemeral and now - float(r.last_seen) > ttl_secs)


def prune_interval_secs(ttl_secs: float) -> float:
    """How often to look: a quarter of the TTL, at most every five minutes."""
    return min(ttl_secs / 4, MAX_PRUNE_INTERVAL_SECS)


async def prune_agents(engine: AsyncEngine, now: float, ttl_secs: float) -> list[str]:
    """Delete the stale ephemeral rows; returns their machine ids. The delete re-checks
    staleness, so a row seen again meanwhile stays (and a pruned agent that is in fact still
    connected is recorded again on its next heartbeat)."""
    async with engine.begin() as conn:
        stale = stale_agents(await queries.fetch_agents(conn), now, ttl_secs)
        if stale:
            await queries.delete_stale_agents(conn, stale, last_seen_before=now - ttl_secs)
    if stale:
        log.info("pruned %d stale ephemeral agent records", len(stale))
    return stale


async def run_pruner(engine: AsyncEngine, ttl_secs: float, clock: Callable[[], float]) -> None:
    """Prune forever. A failed pass (the database is busy, say) is logged and tried again at
    the next interval: the task must outlive transient errors."""
    interval = prune_interval_secs(ttl_secs)
    while True:
        try:
            await prune_agents(engine, clock(), ttl_secs)
        except Exception:
            log.exception("pruning agent records failed; trying again in %.0f s", interval)
        await asyncio.sleep(interval)
