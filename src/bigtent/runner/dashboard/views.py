"""What each dashboard page shows, gathered from the database and the scheduler's memory.

Each ``load_*`` reads (never writes) and returns plain values for a template; formatting
is ``present``'s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bigtent.errors import NotFound
from bigtent.runner.cache import StorageFullEvents
from bigtent.runner.components import Components
from bigtent.runner.dashboard import present
from bigtent.runner.db import queries
from bigtent.runner.scheduler.health import is_unhealthy, shown_error
from bigtent.runner.scheduler.model import AGENT
from bigtent.states import BuildState, StepState

RECENT_BUILDS = 25
RUNNING_STEPS_SHOWN = 50
LOG_TAIL_LINES = 40
FAILED_TAILS_SHOWN = 20
"""Failed steps shown with the end of their log (the rest are in the steps table)."""
STEPS_SHOWN = 1000
WAITING_SHOWN = 20
"""Steps waiting for capacity listed on a build's page (the rest are counted)."""
"""Rows of a build's steps table (failed ones first)."""
CACHE_TOTALS_TTL_SECS = 10.0
"""The cache's size is a sum over every path: computed at most this often."""
LOG_PAGE_BYTES = 256 * 1024
"""The step page shows at most this much of the end of a log (the full log is a link)."""
SEARCH_LIMIT = 50
MIN_SEARCH_CHARS = 3
STEP_BUILDS_SHOWN = 20
ATTEMPTS_SHOWN = 500
"""Attempt records on a build page (the first ones; the API pages through all of them)."""
STEP_ATTEMPTS_SHOWN = 200
"""A step page's newest attempt records."""
EVENTS_SHOWN = 200
"""A build page's newest events."""
_MAX_ID = 2**63 - 1


def known_id(ident: int, what: str) -> int:
    """Ids are positive 64-bit integers; any other number names nothing."""
    if not 0 < ident <= _MAX_ID:
        raise NotFound(f"no {what} {ident}")
    return ident


@dataclass(frozen=True, slots=True)
class BuildRow:
    id: int
    state: str
    priority: int
    created_at: float
    finished_at: float | None
    created_by: str
    progress: present.Progress
    repository: str | None = None
    ref: str | None = None
    roots: list[str] = field(default_factory=list)
    """The names of its first requested derivations (``present.roots_summary``)."""
    more_roots: int = 0
    took_secs: float | None = None
    """Time at least one of its steps ran (``present.busy_secs``); None: not looked up."""


@dataclass(frozen=True, slots=True)
class StepRow:
    id: int
    name: str
    drv_path: str
    system: str
    state: str
    outcome: str | None
    error: str | None
    agent_name: str | None
    attempts: int
    created_at: float
    assigned_at: float | None
    started_at: float | None
    finished_at: float | None
    prepare_secs: float | None
    build_secs: float | None
    upload_secs: float | None
    exit_code: int | None
    required_features: list[str]
    outputs: dict[str, str]

    def queued_secs(self, now: float) -> float | None:
        """From queued to handed to a venue (so far, while it waits)."""
        if self.assigned_at is not None:
            return self.assigned_at - self.created_at
        return None if present.is_final(self.state) else now - self.created_at

    def run_secs(self, now: float) -> float | None:
        """From the venue accepting it to its end (so far, while it runs)."""
        start = self.started_at or self.assigned_at
        if start is None:
            return None
        if self.finished_at is not None:
            return self.finished_at - start
        return now - start if StepState(self.state).is_leased else None


def _step_row(r: Any) -> StepRow:
    return StepRow(
        id=int(r.id),
        name=str(r.name),
        drv_path=str(r.drv_path),
        system=str(r.system),
        state=str(r.state),
        outcome=r.outcome,
        error=r.error,
        agent_name=r.agent_name,
        attempts=int(r.attempts),
        created_at=float(r.created_at),
        assigned_at=r.assigned_at,
        started_at=r.started_at,
        finished_at=r.finished_at,
        prepare_secs=r.prepare_secs,
        build_secs=r.build_secs,
        upload_secs=r.upload_secs,
        exit_code=r.exit_code,
        required_features=json.loads(r.required_features),
        outputs=json.loads(r.outputs),
    )


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """One attempt of a step (docs/dashboard.md): where it ran, how it ended, why, and when
    the step will be tried again (None: the outcome was final)."""

    id: int
    step_id: int
    name: str
    attempt: int
    max_attempts: int
    agent_name: str | None
    started_at: float | None
    finished_at: float
    outcome: str
    error: str | None
    retry_at: float | None

    @property
    def ran_secs(self) -> float | None:
        return None if self.started_at is None else self.finished_at - self.started_at


def _attempt_row(r: Any) -> AttemptRow:
    return AttemptRow(
        id=int(r.id),
        step_id=int(r.step_id),
        name=str(r.name),
        attempt=int(r.attempt),
        max_attempts=int(r.max_attempts),
        agent_name=r.agent_name,
        started_at=r.started_at,
        finished_at=float(r.finished_at),
        outcome=str(r.outcome),
        error=r.error,
        retry_at=r.retry_at,
    )


# ---- overview --------------------------------------------------------------------------------
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


TOOK_TTL_SECS = 10.0
"""A running build's "took" in the build lists is recomputed from its attempts at most this
often (a finished build's once, until a restart changes its end)."""
TOOK_CACHED_BUILDS = 2000


@dataclass(eq=False)
class TookCache:
    """How long builds took (``present.busy_secs``), for the build lists (the overview polls
    every few seconds): each build's attempt records are read at most every ``ttl_secs``
    while it runs, and once after it ended (again when its end changes: a restart), and kept
    as a few merged spans (``present.merge_spans``), not one read of every attempt per view.
    Measured: 100,000 attempt records take ~0.6 s to read and ~0.3 s to add up."""

    ttl_secs: float = TOOK_TTL_SECS
    max_builds: int = TOOK_CACHED_BUILDS
    _spans: dict[int, tuple[float | None, float, list[tuple[float, float | None]]]] = field(
        default_factory=dict
    )
    """Build id -> (its end when read, when read (monotonic), merged spans)."""

    async def spans(
        self, conn: Any, rows: Sequence[Any]
    ) -> dict[int, list[tuple[float, float | None]]]:
        mono = time.monotonic()
        stale = [
            b
            for b in rows
            if (got := self._spans.get(int(b.id))) is None
            or got[0] != b.finished_at
            or (b.finished_at is None and mono - got[1] >= self.ttl_secs)
        ]
        if stale:
            fresh = await queries.fetch_build_run_intervals(conn, [int(b.id) for b in stale])
            for b in stale:
                merged = present.merge_spans(fresh[int(b.id)], float(b.created_at))
                self._spans.pop(int(b.id), None)
                self._spans[int(b.id)] = (b.finished_at, mono, merged)
            while len(self._spans) > self.max_builds:  # the longest unread go first
                del self._spans[next(iter(self._spans))]
        return {int(b.id): self._spans[int(b.id)][2] for b in rows}


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
        builds = await _build_rows(
            conn, await queries.fetch_builds(conn, RECENT_BUILDS), now, took or TookCache()
        )
        agent_rows = await queries.fetch_agents(conn)
    live = {mid for mid, v in sched.venue_infos().items() if v.kind == AGENT}
    connected = [r for r in agent_rows if r.machine_id in live]
    ssh_usable = sum(1 for b in comps.ssh.describe(now) if b["usable"])
    last_gc = comps.collector.last if comps.collector is not None else None
    running = sorted((_step_row(r) for r in running_rows), key=lambda s: s.id)
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


def _build_row(
    b: Any,
    counts: dict[str, int],
    root_names: tuple[Sequence[str], int] = ((), 0),
    intervals: Iterable[tuple[float, float | None]] | None = None,
    now: float | None = None,
) -> BuildRow:
    shown, more = present.roots_summary(*root_names)
    took = None
    if intervals is not None and now is not None:
        end = float(b.finished_at) if b.finished_at is not None else now
        took = present.busy_secs(intervals, float(b.created_at), end)
    return BuildRow(
        id=int(b.id),
        state=str(b.state),
        priority=int(b.priority),
        created_at=float(b.created_at),
        finished_at=b.finished_at,
        created_by=str(b.created_by),
        progress=present.progress_from_counts(counts),
        repository=b.repository,
        ref=b.ref,
        roots=shown,
        more_roots=more,
        took_secs=took,
    )


async def _build_rows(
    conn: Any, rows: Sequence[Any], now: float, took: TookCache
) -> list[BuildRow]:
    """List rows for these builds: progress, what each was for, how long it took."""
    ids = [int(b.id) for b in rows]
    per_build = await queries.fetch_build_state_counts(conn, ids)
    names = await queries.fetch_root_names(conn, ids)
    spans = await took.spans(conn, rows)
    return [
        _build_row(b, per_build.get(int(b.id), {}), names[int(b.id)], spans[int(b.id)], now)
        for b in rows
    ]


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
    before = before_id if before_id is not None and 0 < before_id <= _MAX_ID else None
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
        shown = await _build_rows(conn, rows[:limit], now, took or TookCache())
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
class DepLink:
    """A dependency that failed (or was dependency-failed, or cancelled): why a
    dependency-failed step failed."""

    id: int
    name: str
    state: str


async def _failed_deps(conn: Any, step_ids: Sequence[int]) -> dict[int, list[DepLink]]:
    found = await queries.fetch_failed_dependencies(conn, step_ids)
    return {
        sid: [DepLink(int(d.id), str(d.name), str(d.state)) for d in deps]
        for sid, deps in found.items()
    }


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
            (_step_row(r) for r in rows), key=lambda s: present.step_order_key(s.state, s.id)
        )
        failed_deps = await _failed_deps(
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
        build=_build_row(build, counts, names[build_id], spans[build_id], now),
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
        attempts=[_attempt_row(r) for r in attempts],
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


# ---- one step --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StepPage:
    now: float
    step: StepRow
    build_ids: list[int]
    log_text: str
    log_offset: int
    """Where the shown log ends (the live stream continues from here)."""
    log_skipped: int
    """Bytes at the start of the log not shown on the page."""
    attempts: list[AttemptRow] = field(default_factory=list)
    """Its newest attempts (``STEP_ATTEMPTS_SHOWN``), oldest first."""
    waiting_reason: str | None = None
    """Why the step waits, when no venue can take it (``Scheduler.waiting_reason``)."""
    failed_deps: list[DepLink] = field(default_factory=list)
    """For a dependency-failed step: its dependencies that failed."""
    cached_in: set[int] = field(default_factory=set)
    """Which of ``build_ids`` failed it from the failure cache (did not run it)."""

    @property
    def live(self) -> bool:
        return not present.is_final(self.step.state)


async def load_step(comps: Components, step_id: int) -> StepPage:
    known_id(step_id, "step")
    async with comps.engine.connect() as conn:
        row = await queries.fetch_step(conn, step_id)
        if row is None:
            raise NotFound(f"no step {step_id}")
        build_ids = await queries.fetch_step_build_ids(conn, step_id, STEP_BUILDS_SHOWN)
        attempts = await queries.fetch_step_attempts(conn, step_id, STEP_ATTEMPTS_SHOWN)
        failed_deps = (
            (await _failed_deps(conn, [step_id])).get(step_id, [])
            if row.state == StepState.DEPENDENCY_FAILED
            else []
        )
        cached_in = await queries.fetch_cached_failure_builds(conn, step_id, build_ids)
    size = comps.logs.size(step_id)
    start = max(0, size - LOG_PAGE_BYTES)
    data = comps.logs.read_range(step_id, start, size)
    if start:
        # Start at a line boundary.
        cut = data.find(b"\n")
        if 0 <= cut < len(data) - 1:
            start += cut + 1
            data = data[cut + 1 :]
    return StepPage(
        now=comps.scheduler.clock(),
        step=_step_row(row),
        build_ids=build_ids,
        log_text=present.strip_ansi(data.decode(errors="replace")),
        log_offset=size,
        log_skipped=start,
        attempts=[_attempt_row(r) for r in attempts],
        waiting_reason=comps.scheduler.waiting_reason(step_id),
        failed_deps=failed_deps,
        cached_in=cached_in,
    )


# ---- agents ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AgentRow:
    machine_id: str
    name: str
    hostname: str
    systems: list[str]
    features: list[str]
    ephemeral: bool
    auth_kind: str
    oidc: dict[str, str | None] | None
    launch_id: str | None
    version: str
    connected: bool
    draining: bool
    last_seen: float
    running: int
    max_jobs: int
    load: float | None
    memory: str | None
    backoff_until: float | None
    consecutive_failures: int
    succeeded: int
    failed: int
    infra_failures: int
    trusted: bool = True
    """A trusted venue (trusted builds' steps) or an untrusted one (docs/security.md)."""
    unhealthy: bool = False
    """Too many consecutive infrastructure failures (docs/agents.md, unhealthy agents)."""
    last_error: str | None = None


LAUNCHES_SHOWN = 50


@dataclass(frozen=True, slots=True)
class LaunchRow:
    """An autoscaler launch (docs/autoscaling.md)."""

    launch_id: str
    pool: str
    state: str
    created_at: float
    agent_name: str | None


@dataclass(frozen=True, slots=True)
class AgentsPage:
    now: float
    agents: list[AgentRow]
    builders: list[dict[str, Any]]
    launches: list[LaunchRow] = field(default_factory=list)


async def load_agents(comps: Components) -> AgentsPage:
    sched = comps.scheduler
    now = sched.clock()
    async with comps.engine.connect() as conn:
        rows = await queries.fetch_agents(conn)
    out = []
    live = sched.venue_infos()
    for r in rows:
        venue = live.get(r.machine_id)
        session = comps.sessions.live.get(r.machine_id)
        beat = session.last_heartbeat if session is not None and venue is not None else None
        backoff = venue.backoff_until if venue else (r.backoff_until or 0.0)
        failures = venue.consecutive_failures if venue else int(r.consecutive_failures)
        memory = None
        if beat is not None and beat.memory_used_bytes is not None and beat.memory_total_bytes:
            memory = (
                f"{present.fmt_bytes(beat.memory_used_bytes)} / "
                f"{present.fmt_bytes(beat.memory_total_bytes)}"
            )
        out.append(
            AgentRow(
                machine_id=str(r.machine_id),
                name=str(r.name),
                hostname=str(r.hostname),
                systems=json.loads(r.systems),
                features=json.loads(r.supported_features),
                ephemeral=bool(r.ephemeral),
                auth_kind=str(r.auth_kind),
                oidc=(
                    {
                        "issuer": r.oidc_issuer,
                        "repository": r.oidc_repository,
                        "subject": r.oidc_subject,
                        "workflow_ref": r.oidc_workflow_ref,
                        "ref": r.oidc_ref,
                    }
                    if r.auth_kind == "oidc"
                    else None
                ),
                launch_id=r.launch_id,
                version=str(r.version),
                connected=venue is not None,
                draining=venue.draining if venue else False,
                last_seen=float(r.last_seen),
                running=venue.running if venue else 0,
                max_jobs=int(r.max_jobs),
                load=beat.load if beat is not None else None,
                memory=memory,
                backoff_until=backoff if backoff > now else None,
                consecutive_failures=failures,
                succeeded=int(r.steps_succeeded),
                failed=int(r.steps_failed),
                infra_failures=int(r.infra_failures),
                trusted=bool(r.trusted),
                unhealthy=is_unhealthy(failures, comps.config.scheduler.unhealthy_after_failures),
                last_error=shown_error(
                    venue.last_error if venue else r.health_last_error, failures
                ),
            )
        )
    out.sort(key=lambda a: (not a.connected, a.name))
    return AgentsPage(
        now=now,
        agents=out,
        builders=comps.ssh.describe(now),
        launches=await load_launches(comps),
    )


async def load_launches(comps: Components) -> list[LaunchRow]:
    """The newest autoscaler launches (``workflow_dispatch`` runs and whether their agents
    came), from the launches table."""
    async with comps.engine.connect() as conn:
        rows = await queries.fetch_launches(conn, limit=LAUNCHES_SHOWN)
    return [
        LaunchRow(
            launch_id=r.launch_id,
            pool=r.pool,
            state=r.state,
            created_at=float(r.created_at),
            agent_name=r.agent_name,
        )
        for r in rows
    ]


# ---- search ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SearchPage:
    query: str
    too_short: bool
    steps: list[StepRow]
    paths: list[Any]


async def search(comps: Components, query: str) -> SearchPage:
    """Steps by .drv or output path, and cached paths, containing ``query``."""
    text = query.strip()
    if len(text) < MIN_SEARCH_CHARS:
        return SearchPage(query, bool(text), [], [])
    async with comps.engine.connect() as conn:
        steps = await queries.search_steps(conn, text, SEARCH_LIMIT)
        paths = await queries.search_store_paths(conn, text, SEARCH_LIMIT)
    return SearchPage(query, False, [_step_row(r) for r in steps], paths)
