"""The autoscaler service: gathers a snapshot, calls ``plan``, records launches in the
database and dispatches them (docs/autoscaling.md).

Every launch is written (``pending``) before its dispatch is sent, so a runner that stops at
any point restarts with every launch that may be on its way still counted: it never launches
twice for the same work. The loop runs ``tick`` every ``poll_interval_secs`` (the smallest of
the pools'), or sooner when the scheduler reports new runnable work, but never more often than
``autoscale.min_tick_interval_secs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.config.autoscale import AutoscaleSection, GithubPoolSection, load_token
from bigtent.errors import DispatchFailed
from bigtent.runner.auth.policy import AgentIdentity
from bigtent.runner.autoscale.github import GithubWorkflow
from bigtent.runner.autoscale.plan import (
    BuildScope,
    ConnectedSlots,
    LaunchView,
    PendingLaunch,
    PoolPlan,
    PoolSpec,
    Work,
    claim_refusal,
    cooldown_end,
    dispatch_inputs,
    expired,
    new_launch_id,
    next_expiry,
    plan,
)
from bigtent.runner.db import queries
from bigtent.runner.metrics import Metrics
from bigtent.runner.scheduler.matching import VenueView
from bigtent.runner.scheduler.service import Scheduler
from bigtent.states import LaunchState

log = logging.getLogger(__name__)

_ERROR_PAUSE_SECS = 5.0
"""After a failed pass (a bug, a database error), wait this long before the next one."""


@dataclass(slots=True)
class PoolCounters:
    """What happened to one pool's launches since the runner started (for metrics)."""

    launches: int = 0
    """Dispatches GitHub accepted (204)."""
    registrations: int = 0
    """Launches whose agent registered."""
    expiries: int = 0
    """Launches whose agent did not register within ``launch_ttl_secs`` (failed launches)."""
    dispatch_failures: int = 0
    """Dispatches that failed (each started a cooldown)."""


@dataclass(slots=True)
class _Pool:
    config: GithubPoolSection
    spec: PoolSpec
    workflow: GithubWorkflow
    counters: PoolCounters = field(default_factory=PoolCounters)


def build_workflows(section: AutoscaleSection) -> list[GithubWorkflow]:
    """Every pool's dispatch client, its token loaded (ConfigError when one cannot be read)."""
    tokens = [load_token(i, pool) for i, pool in enumerate(section.github)]
    return [GithubWorkflow(pool, tok) for pool, tok in zip(section.github, tokens, strict=True)]


def pool_spec(pool: GithubPoolSection) -> PoolSpec:
    return PoolSpec(
        name=pool.name,
        systems=frozenset(pool.systems),
        supported_features=frozenset(pool.supported_features),
        mandatory_features=frozenset(pool.mandatory_features),
        max_jobs=pool.max_jobs,
        allowed_repositories=frozenset(pool.allowed_build_repositories),
        max_inflight=pool.max_inflight,
    )


class Autoscaler:
    """Launches ephemeral agents for the ``[[autoscale.github]]`` pools."""

    def __init__(
        self,
        section: AutoscaleSection,
        workflows: Sequence[GithubWorkflow],
        engine: AsyncEngine,
        scheduler: Scheduler,
        *,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.section = section
        self.metrics = metrics if metrics is not None else Metrics()
        self.engine = engine
        self.scheduler = scheduler
        self.clock = clock
        self.pools = {w.pool.name: _Pool(w.pool, pool_spec(w.pool), w) for w in workflows}
        self.metrics.autoscaler_pools(sorted(self.pools))
        self.pending: dict[str, LaunchView] = {}
        """Launches whose agent has not registered yet (the database's ``pending`` rows)."""
        self.cooldown_until: dict[str, float] = {}
        self.last_plans: dict[str, PoolPlan] = {}
        self.ticks = 0
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        if self.pools:
            scheduler.on_work(self.wake)
            scheduler.add_launchable(self.offers)

    def offers(self) -> list[VenueView]:
        """What each pool could launch, as the scheduler's capacity (``capacity.assess``): a
        pool's agent, scoped to the pool's allowed repositories, whatever its cooldown or
        in-flight launches (they pass)."""
        return [
            replace(pool.spec.view, repositories=pool.spec.allowed_repositories)
            for pool in self.pools.values()
        ]

    @property
    def enabled(self) -> bool:
        return bool(self.pools)

    async def aclose(self) -> None:
        for pool in self.pools.values():
            await pool.workflow.aclose()

    async def load(self) -> None:
        """Pending launches and running cooldowns from the database (a restart forgets
        neither)."""
        async with self.engine.connect() as conn:
            rows = await queries.fetch_launches(conn, states=[LaunchState.PENDING])
            retry = await queries.fetch_launch_retry_at(conn)
        self.pending = {r.launch_id: _view(r) for r in rows}
        now = self.clock()
        self.cooldown_until = {p: at for p, at in retry.items() if p in self.pools and at > now}
        if self.pools:
            log.info(
                "autoscaler: %d pools (%s), %d launches pending",
                len(self.pools),
                ", ".join(sorted(self.pools)),
                len(self.pending),
            )

    # ---- the loop -------------------------------------------------------------------------
    def wake(self) -> None:
        """New runnable work: look at the demand soon (not sooner than the minimum interval)."""
        self._wake.set()

    async def run(self) -> None:
        """Tick forever: until woken or until the next poll, expiry or cooldown end. A failed
        pass is logged and retried after a pause."""
        while True:
            self._wake.clear()
            started = self.clock()
            try:
                wake_at = await self.tick(started)
            except Exception:
                log.exception("autoscaler pass failed; trying again in %.0f s", _ERROR_PAUSE_SECS)
                wake_at = self.clock() + _ERROR_PAUSE_SECS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, wake_at - self.clock()))
            rest = started + self.section.min_tick_interval_secs - self.clock()
            if rest > 0:
                await asyncio.sleep(rest)  # rate limit: a burst of new work is one pass

    async def tick(self, now: float) -> float:
        """One pass at ``now``: expire overdue launches, plan, record and dispatch launches.
        Returns when the next pass is due."""
        async with self._lock:
            self.ticks += 1
            await self._expire(now)
            # One synchronous snapshot of the queue and the venues: no await in between.
            sched = self.scheduler
            nodes = sched.runnable_steps()
            # Every venue, so that a busy agent's launch id still counts it as registered; a
            # draining one or one in backoff has no free slot.
            venues = list(sched.venue_infos().values())
            views = {
                v.machine_id: v.view
                if not v.draining and v.backoff_until <= now
                else replace(v.view, running=v.max_jobs)
                for v in venues
            }
            async with self.engine.connect() as conn:
                scopes = await queries.fetch_build_scopes(
                    conn, [b for n in nodes for b in n.builds]
                )
                launched = {
                    r.launch_id: r
                    for r in await queries.fetch_launches_by_ids(
                        conn, [v.launch_id for v in venues if v.launch_id]
                    )
                }
            work = [
                Work(n.req, frozenset(BuildScope(*scopes[b]) for b in n.builds if b in scopes))
                for n in nodes
            ]
            connected = []
            for v in venues:
                row = launched.get(v.launch_id or "")
                pool = self.pools.get(row.pool) if row is not None else None
                view = views[v.machine_id]
                if row is None or pool is None or row.agent_machine_id not in (None, v.machine_id):
                    # Not a pool's agent: scoped as the dispatcher scopes it (an OIDC agent by
                    # its issuer rule's build repositories, a token agent not at all).
                    connected.append(ConnectedSlots(view, view.repositories))
                else:
                    connected.append(
                        ConnectedSlots(view, pool.spec.allowed_repositories, row.launch_id)
                    )
            pending = [
                PendingLaunch(launch.launch_id, launch.pool) for launch in self.pending.values()
            ]
            plans = plan(
                work,
                connected,
                [p.spec for p in self.pools.values()],
                pending,
                now,
                self.cooldown_until,
            )
            self.last_plans = {p.pool: p for p in plans}
            for p in plans:
                if p.launch:
                    log.info(
                        "pool %s: %d steps it could take wait, %d pending launches cover %d; "
                        "launching %d (deficit %d, max_inflight %d)",
                        p.pool,
                        p.demand,
                        p.pending,
                        p.covered,
                        p.launch,
                        p.deficit,
                        self.pools[p.pool].config.max_inflight,
                    )
                    await self._launch(self.pools[p.pool], p.launch)
            return self._next_wake(self.clock())

    def _next_wake(self, now: float) -> float:
        poll = min((p.config.poll_interval_secs for p in self.pools.values()), default=60.0)
        times = [now + poll]
        expiry = next_expiry(self.pending.values(), self._ttls())
        if expiry is not None:
            times.append(expiry)
        times.extend(at for at in self.cooldown_until.values() if at > now)
        return min(times)

    def _ttls(self) -> dict[str, float]:
        return {name: p.config.launch_ttl_secs for name, p in self.pools.items()}

    async def _expire(self, now: float) -> None:
        due = expired(self.pending.values(), self._ttls(), now)
        if not due:
            return
        done: list[LaunchView] = []
        async with self.engine.begin() as conn:
            for launch_id in due:
                launch = self.pending[launch_id]
                pool = self.pools.get(launch.pool)
                error = (
                    f"no agent registered within launch_ttl_secs "
                    f"({pool.config.launch_ttl_secs:g} s)"
                    if pool is not None
                    else "its pool is no longer configured"
                )
                # Not over a registration that got in first (unless_state).
                if await queries.update_launch(
                    conn,
                    launch_id,
                    unless_state=LaunchState.REGISTERED,
                    state=LaunchState.EXPIRED,
                    error=error,
                    updated_at=now,
                ):
                    done.append(launch)
        for launch_id in due:
            self.pending.pop(launch_id, None)
        for launch in done:
            pool = self.pools.get(launch.pool)
            if pool is not None:
                pool.counters.expiries += 1
                self.metrics.autoscaler_launch_expired(pool.config.name)
            log.warning(
                "pool %s: launch %s expired: no agent registered", launch.pool, launch.launch_id
            )

    async def _launch(self, pool: _Pool, count: int) -> None:
        """Record and dispatch ``count`` launches one by one; the first failure stops the
        rest and starts the pool's cooldown."""
        cfg = pool.config
        for _ in range(count):
            launch_id = new_launch_id()
            created = self.clock()
            async with self.engine.begin() as conn:
                await queries.insert_launch(conn, launch_id, cfg.name, LaunchState.PENDING, created)
            self.pending[launch_id] = LaunchView(launch_id, cfg.name, created, LaunchState.PENDING)
            inputs = dispatch_inputs(
                name=cfg.name,
                runner_url=cfg.runner_url,
                audience=cfg.audience,
                systems=cfg.systems,
                supported_features=cfg.supported_features,
                mandatory_features=cfg.mandatory_features,
                max_jobs=cfg.max_jobs,
                launch_id=launch_id,
                bigtent_version=cfg.bigtent_version,
            )
            try:
                await pool.workflow.dispatch(inputs, created)
            except DispatchFailed as exc:
                now = self.clock()
                until = cooldown_end(now, cfg.cooldown_secs, exc.retry_after_secs)
                self.cooldown_until[cfg.name] = until
                self.pending.pop(launch_id, None)
                pool.counters.dispatch_failures += 1
                self.metrics.autoscaler_dispatch_failed(pool.config.name)
                async with self.engine.begin() as conn:
                    await queries.update_launch(
                        conn,
                        launch_id,
                        unless_state=LaunchState.REGISTERED,
                        state=LaunchState.FAILED,
                        error=exc.message[:2000],
                        retry_at=until,
                        updated_at=now,
                    )
                log.warning(
                    "pool %s: launch %s failed: %s; no dispatch for %.0f s",
                    cfg.name,
                    launch_id,
                    exc.message,
                    until - now,
                )
                return
            pool.counters.launches += 1
            self.metrics.autoscaler_launched(pool.config.name)
            log.info("pool %s: launch %s dispatched (%s)", cfg.name, launch_id, cfg.workflow_label)

    # ---- agents ---------------------------------------------------------------------------
    async def registered(
        self, launch_id: str, machine_id: str, name: str, identity: AgentIdentity | None
    ) -> None:
        """An agent registered reporting ``launch_id`` (sessions.py): it becomes that launch's
        agent if ``claim_refusal`` allows. Never raises into the session."""
        try:
            await self._registered(launch_id, machine_id, name, identity)
        except SQLAlchemyError:
            log.warning("could not record the registration of launch %s", launch_id, exc_info=True)

    async def _registered(
        self, launch_id: str, machine_id: str, name: str, identity: AgentIdentity | None
    ) -> None:
        now = self.clock()
        async with self.engine.begin() as conn:
            row = await queries.fetch_launch(conn, launch_id)
            if row is None:
                log.info("agent %s reported launch id %s, which no pool made", name, launch_id)
                return
            pool = self.pools.get(row.pool)
            refusal = self._claim_refusal(row, machine_id, identity)
            if refusal is not None:
                log.warning(
                    "agent %s reported launch %s of pool %s, but is not its agent: %s",
                    name,
                    launch_id,
                    row.pool,
                    refusal,
                )
                return
            if row.state == LaunchState.REGISTERED:
                return  # the same machine again
            await queries.update_launch(
                conn,
                launch_id,
                state=LaunchState.REGISTERED,
                agent_machine_id=machine_id,
                agent_name=name,
                updated_at=now,
            )
        self.pending.pop(launch_id, None)
        if pool is not None:
            pool.counters.registrations += 1
            self.metrics.autoscaler_registered(pool.config.name)
        log.info(
            "pool %s: launch %s registered as agent %s after %.0f s (was %s)",
            row.pool,
            launch_id,
            name,
            now - float(row.created_at),
            row.state,
        )

    async def claim_scope(
        self, launch_id: str, machine_id: str, identity: AgentIdentity | None
    ) -> frozenset[str] | None:
        """The build repositories an agent registering with ``launch_id`` serves because it
        is that pool's launched agent (``claim_refusal`` lets it claim the launch): the pool's
        ``allowed_build_repositories``, which may name more than the workflow's repository
        (architecture §6). None: it is no pool's agent, its issuer rule alone scopes it."""
        async with self.engine.connect() as conn:
            row = await queries.fetch_launch(conn, launch_id)
        if row is None:
            return None
        pool = self.pools.get(row.pool)
        if pool is None or self._claim_refusal(row, machine_id, identity) is not None:
            return None
        return pool.spec.allowed_repositories

    def _claim_refusal(
        self, row: Any, machine_id: str, identity: AgentIdentity | None
    ) -> str | None:
        """``claim_refusal`` for a launch row and a registering agent."""
        pool = self.pools.get(row.pool)
        return claim_refusal(
            LaunchState(row.state),
            row.agent_machine_id,
            machine_id,
            pool.config.workflow_repository if pool is not None else None,
            identity.repository if identity is not None else None,
        )

    # ---- read side ------------------------------------------------------------------------
    def counters(self) -> dict[str, dict[str, int]]:
        """Per pool: launches, registrations, expiries, dispatch_failures (metrics)."""
        return {name: asdict(p.counters) for name, p in sorted(self.pools.items())}

    def describe(self, now: float) -> list[dict[str, Any]]:
        """Every pool with its limits, last plan, cooldown and counters (the API's view)."""
        out = []
        for name, pool in sorted(self.pools.items()):
            cfg = pool.config
            last = self.last_plans.get(name)
            until = self.cooldown_until.get(name, 0.0)
            out.append(
                {
                    "name": name,
                    "workflow": cfg.workflow_label,
                    "systems": cfg.systems,
                    "max_jobs": cfg.max_jobs,
                    "max_inflight": cfg.max_inflight,
                    "pending": sum(1 for x in self.pending.values() if x.pool == name),
                    "demand": last.demand if last else 0,
                    "covered": last.covered if last else 0,
                    "deficit": last.deficit if last else 0,
                    "cooldown_until": until if until > now else None,
                    "counters": asdict(pool.counters),
                }
            )
        return out


def _view(row: Any) -> LaunchView:
    return LaunchView(row.launch_id, row.pool, float(row.created_at), LaunchState(row.state))


def counters_total(counters: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """All pools' counters summed (zeros without pools)."""
    total: dict[str, int] = asdict(PoolCounters())
    for per_pool in counters.values():
        for key, value in per_pool.items():
            total[key] = total.get(key, 0) + value
    return total
