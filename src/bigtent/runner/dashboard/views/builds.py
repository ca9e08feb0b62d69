"""The builds pages: every build (filtered, by pages) and one build (its roots, steps,
failures, waiting steps, attempts and events)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bigtent.apilimits import MAX_ID, known_id
from bigtent.errors import NotFound
from bigtent.runner.components import Components
from bigtent.runner.dashboard import present
from bigtent.runner.dashboard.views.rows import (
    AttemptRow,
    BuildRow,
    DepLink,
    StepRow,
    TookCache,
    attempt_row,
    build_row,
    build_rows,
    dep_links,
    step_row,
)
from bigtent.runner.db import queries
from bigtent.states import BuildState, StepState

LOG_TAIL_LINES = 40
FAILED_TAILS_SHOWN = 20
"""Failed steps shown with the end of their log (the rest are in the steps table)."""
STEPS_SHOWN = 1000
"""Rows of a build's steps table (failed ones first)."""
WAITING_SHOWN = 20
"""Steps waiting for capacity listed on a build's page (the rest are counted)."""
ATTEMPTS_SHOWN = 500
"""Attempt records on a build page (the first ones; the API pages through all of them)."""
EVENTS_SHOWN = 200
"""A build page's newest events."""


# ---- every build ----------------------------------------------------------------------------
BUILDS_PAGE = 50
"""Builds per page of ``/builds`` (``?limit=`` asks for 1 to ``BUILDS_PAGE_MAX``)."""
BUILDS_PAGE_MAX = 200
FILTER_MAX_CHARS = 256
"""A filter value longer than any stored one (a repository, ref or token name) matches
nothing: it is cut here."""


@dataclass(frozen=True, slots=True)
class BuildFilters:
    """The ``/builds`` filters: each an exact match, empty for any."""

    state: str = ""
    repository: str = ""
    ref: str = ""
    creator: str = ""

    def query(self, **more: int | str) -> dict[str, int | str]:
        """The non-empty filters (and ``more``), for a link's query string."""
        base: dict[str, int | str] = {
            k: v
            for k, v in (
                ("state", self.state),
                ("repository", self.repository),
                ("ref", self.ref),
                ("creator", self.creator),
            )
            if v
        }
        return base | more


@dataclass(frozen=True, slots=True)
class BuildsPage:
    now: float
    filters: BuildFilters
    builds: list[BuildRow]
    limit: int
    before_id: int | None
    older_than: int | None
    """The ``before`` of the next (older) page; None on the last page."""
    states: list[str] = field(default_factory=list)


async def load_builds(
    comps: Components,
    filters: BuildFilters,
    limit: int,
    before_id: int | None,
    took: TookCache | None = None,
) -> BuildsPage:
    """A page of builds, newest first, filtered (``queries.fetch_builds``), one
    more fetched than shown to know whether an older page exists."""
    limit = max(1, min(limit, BUILDS_PAGE_MAX))
    before = before_id if before_id is not None and 0 < before_id <= MAX_ID else None
    now = comps.scheduler.clock()
    async with comps.engine.connect() as conn:
        rows = await queries.fetch_builds(
            conn,
            limit + 1,
            states=[filters.state] if filters.state else (),
            repository=filters.repository or None,
            ref=filters.ref or None,
            created_by=filters.creator or None,
            before_id=before,
        )
        shown = await build_rows(conn, rows[:limit], now, took or TookCache())
    return BuildsPage(
        now=now,
        filters=filters,
        builds=shown,
        limit=limit,
        before_id=before,
        older_than=shown[-1].id if len(rows) > limit else None,
        states=[str(v) for v in BuildState],
    )


# ---- one build -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CachedHit:
    """A step this build failed at once from the failure cache (``cached_failure_hits``):
    the failure it reused — the attempt that really ran (None fields: no record of it) and
    the build that queued that run — and until when that failure is reused."""

    step_id: int
    name: str
    hit_at: float
    failed_at: float
    outcome: str
    cached_until: float
    attempt_id: int | None
    attempt: int | None
    max_attempts: int | None
    agent_name: str | None
    started_at: float | None
    finished_at: float | None
    error: str | None
    ran_in_build: int | None


def _cached_hit(r: Any) -> CachedHit:
    return CachedHit(
        step_id=int(r.step_id),
        name=str(r.name),
        hit_at=float(r.hit_at),
        failed_at=float(r.failed_at),
        outcome=str(r.failed_outcome),
        cached_until=float(r.cached_until),
        attempt_id=r.attempt_id,
        attempt=r.attempt,
        max_attempts=r.max_attempts,
        agent_name=r.agent_name,
        started_at=r.started_at,
        finished_at=r.finished_at,
        error=r.error,
        ran_in_build=r.ran_in_build,
    )


@dataclass(frozen=True, slots=True)
class FailedStep:
    step: StepRow
    log_tail: str
    hit: CachedHit | None = None
    """Set when this build failed the step from the failure cache."""


@dataclass(frozen=True, slots=True)
class WaitingStep:
    """A runnable step that waits for capacity: why, and since when."""

    step: StepRow
    reason: str
    since: float


@dataclass(frozen=True, slots=True)
class BuildEventRow:
    """One entry of a build's history: who cancelled, bumped or restarted it, and when, or
    what the runner did on its own (an interrupted admission)."""

    at: float
    kind: str
    actor: str
    detail: str | None


@dataclass(frozen=True, slots=True)
class BuildPage:
    now: float
    build: BuildRow
    roots: list[tuple[str, int | None, str]]
    """(drv path, step id or None when it was cached, state)."""
    steps: list[StepRow]
    failed: list[FailedStep]
    more_steps: int = 0
    """Steps not in ``steps`` (past ``STEPS_SHOWN``)."""
    more_failed: int = 0
    """Failed steps shown without their log."""
    attempts: list[AttemptRow] = field(default_factory=list)
    """The attempts of its steps since it was created, oldest first (``ATTEMPTS_SHOWN``)."""
    waiting: list[WaitingStep] = field(default_factory=list)
    """Runnable steps no venue can take (``Scheduler.capacity_waiting``), longest first."""
    more_waiting: int = 0
    events: list[BuildEventRow] = field(default_factory=list)
    """Its newest events (``EVENTS_SHOWN``), oldest first."""
    hits: dict[int, CachedHit] = field(default_factory=dict)
    """Its steps failed from the failure cache, by step id."""
    failed_deps: dict[int, list[DepLink]] = field(default_factory=dict)
    """The failed dependencies of its dependency-failed steps, by step id."""

    @property
    def active(self) -> bool:
        return self.build.state in ("queued", "running")

    @property
    def attempts_capped(self) -> bool:
        """Whether more attempts may exist than ``attempts`` holds."""
        return len(self.attempts) >= ATTEMPTS_SHOWN


async def load_build(comps: Components, build_id: int) -> BuildPage:
    known_id(build_id, "build")
    async with comps.engine.connect() as conn:
        build = await queries.fetch_build(conn, build_id)
        if build is None:
            raise NotFound(f"no build {build_id}")
        roots = await queries.fetch_build_roots(conn, build_id)
        rows = await queries.fetch_build_steps(conn, build_id)
        attempts = await queries.fetch_build_attempts(
            conn, build_id, after=0, since=float(build.created_at), limit=ATTEMPTS_SHOWN
        )
        events = await queries.fetch_build_events(conn, build_id, EVENTS_SHOWN)
        hits = {
            h.step_id: h
            for h in map(_cached_hit, await queries.fetch_build_cached_failure_hits(conn, build_id))
        }
        steps = sorted(
            (step_row(r) for r in rows), key=lambda s: present.step_order_key(s.state, s.id)
        )
        failed_deps = await dep_links(
            conn, [s.id for s in steps[:STEPS_SHOWN] if s.state == StepState.DEPENDENCY_FAILED]
        )
        names = await queries.fetch_root_names(conn, [build_id])
        spans = await queries.fetch_build_run_intervals(conn, [build_id])
    now = comps.scheduler.clock()
    by_id = {s.id: s for s in steps}
    counts: dict[str, int] = {}
    for s in steps:
        counts[s.state] = counts.get(s.state, 0) + 1
    failed = [
        FailedStep(s, present.strip_ansi(comps.logs.tail(s.id, LOG_TAIL_LINES)), hits.get(s.id))
        for s in steps[:FAILED_TAILS_SHOWN]
        if s.state == StepState.FAILED
    ]
    waiting = _waiting_steps(comps, steps)
    return BuildPage(
        now=now,
        build=build_row(build, counts, names[build_id], spans[build_id], now),
        roots=[
            (
                str(r.drv_path),
                r.step_id,
                by_id[r.step_id].state if r.step_id in by_id else "cached",
            )
            for r in roots
        ],
        steps=steps[:STEPS_SHOWN],
        failed=failed,
        more_steps=max(0, len(steps) - STEPS_SHOWN),
        more_failed=max(0, counts.get(StepState.FAILED, 0) - len(failed)),
        attempts=[attempt_row(r) for r in attempts],
        waiting=waiting[:WAITING_SHOWN],
        more_waiting=max(0, len(waiting) - WAITING_SHOWN),
        events=[BuildEventRow(float(e.at), str(e.kind), str(e.actor), e.detail) for e in events],
        hits=hits,
        failed_deps=failed_deps,
    )


def _waiting_steps(comps: Components, steps: list[StepRow]) -> list[WaitingStep]:
    sched = comps.scheduler
    since = sched.capacity_waiting()
    found = [
        WaitingStep(s, reason, since[s.id])
        for s in steps
        if s.id in since
        and s.state == StepState.RUNNABLE
        and (reason := sched.waiting_reason(s.id)) is not None
    ]
    return sorted(found, key=lambda w: (w.since, w.step.id))
