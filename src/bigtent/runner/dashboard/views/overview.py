"""The overview page: the queue, running steps, connected agents, recent builds, the cache."""

from __future__ import annotations

import time
from dataclasses import dataclass

from bigtent.runner.cache.intake import StorageFullEvents
from bigtent.runner.components import Components
from bigtent.runner.dashboard import present
from bigtent.runner.dashboard.views.rows import BuildRow, StepRow, TookCache, build_rows, step_row
from bigtent.runner.db import queries
from bigtent.runner.scheduler.model import AGENT
from bigtent.states import StepState

RECENT_BUILDS = 25


RUNNING_STEPS_SHOWN = 50


CACHE_TOTALS_TTL_SECS = 10.0
"""The cache's size is a sum over every path: computed at most this often."""


@dataclass(frozen=True, slots=True)
class Overview:
    now: float
    queue: dict[str, int]
    """Runnable steps per system."""
    step_counts: dict[str, int]
    running: list[StepRow]
    running_total: int
    online: dict[str, int]
    agents: list[tuple[str, str]]
    """(name, kind) of the connected agents."""
    builds: list[BuildRow]
    cache_paths: int
    cache_bytes: int
    live_viewers: int
    storage_full: StorageFullEvents | None = None
    """Uploads the NAR storage refused as full (since the runner started)."""
    cache_quota: int | None = None
    """The main cache's quota (``[cache.retention] quota_high_bytes``); None: no quota."""
    last_gc_at: float | None = None
    """When this runner's last collection finished (None: none since it started)."""
    last_gc_freed: int = 0


@dataclass(eq=False)
class CacheTotals:
    """The cache's path count and size, recomputed at most every ``ttl_secs`` (one sum over
    every path per refresh, not per page view)."""

    ttl_secs: float = CACHE_TOTALS_TTL_SECS
    _value: tuple[int, int] = (0, 0)
    _at: float | None = None

    async def fetch(self, comps: Components) -> tuple[int, int]:
        now = time.monotonic()
        if self._at is None or now - self._at >= self.ttl_secs:
            async with comps.engine.connect() as conn:
                self._value = await queries.cache_totals(conn)
            self._at = now
        return self._value


async def load_overview(
    comps: Components, totals: CacheTotals, took: TookCache | None = None
) -> Overview:
    sched = comps.scheduler
    now = sched.clock()
    paths, size = await totals.fetch(comps)
    async with comps.engine.connect() as conn:
        counts = await queries.count_steps_by_state(conn)
        running_rows = await queries.fetch_active_steps(
            conn, [StepState.ASSIGNED, StepState.BUILDING]
        )
        builds = await build_rows(
            conn, await queries.fetch_builds(conn, RECENT_BUILDS), now, took or TookCache()
        )
        agent_rows = await queries.fetch_agents(conn)
    live = {mid for mid, v in sched.venue_infos().items() if v.kind == AGENT}
    connected = [r for r in agent_rows if r.machine_id in live]
    ssh_usable = sum(1 for b in comps.ssh.describe(now) if b["usable"])
    last_gc = comps.collector.last if comps.collector is not None else None
    running = sorted((step_row(r) for r in running_rows), key=lambda s: s.id)
    return Overview(
        now=now,
        queue=dict(sorted(sched.queue_depth().items())),
        step_counts=counts,
        running=running[:RUNNING_STEPS_SHOWN],
        running_total=len(running),
        online=present.online_by_kind(
            ((bool(r.ephemeral), r.auth_kind) for r in connected), ssh_usable
        ),
        agents=[(str(r.name), present.agent_kind(bool(r.ephemeral))) for r in connected],
        builds=builds,
        cache_paths=paths,
        cache_bytes=size,
        live_viewers=comps.logs.fanout.total,
        storage_full=comps.cache.storage_full,
        cache_quota=comps.config.cache.retention.quota_high_bytes,
        last_gc_at=last_gc.finished_at if last_gc is not None else None,
        last_gc_freed=last_gc.bytes_freed if last_gc is not None else 0,
    )
