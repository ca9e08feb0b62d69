"""The runner's Prometheus metrics (docs/metrics.md): every metric object lives here.

Each runner has its own ``CollectorRegistry``; nothing is registered in prometheus-client's
global default registry, so several runners can live in one process (tests do). The rest of
the runner calls the small typed methods of ``Metrics`` (``step_finished``, ``auth_failed``,
...); what is a *state* rather than an event (queue depth, connected agents) is read from the
scheduler and the sessions when ``/metrics`` is scraped, by a custom collector, so it can
never drift from the scheduler's own view.

The decisions (which reason an auth failure counts as, which phases an agent's timings
report, how deep the queue is) are pure functions below, driven by the unit tests.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from enum import StrEnum
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from bigtent import __version__
from bigtent.errors import (
    AuthError,
    BigtentError,
    NarMismatch,
    PayloadTooLarge,
    TooManyAuthFailures,
)
from bigtent.protocol import Outcome, Timings
from bigtent.runner.auth.oidc import InvalidToken, IssuerUnavailable
from bigtent.runner.auth.policy import PolicyDenied
from bigtent.runner.scheduler.recovery import RecoveryFailure
from bigtent.runner.scheduler.steps import StepNode
from bigtent.states import StepState

PREFIX = "bigtent"

PHASE_BUCKETS_SECS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0, 7200.0, 14400.0, math.inf,
)  # fmt: skip
"""Upper bounds of the phase histogram: from a few milliseconds (dispatch latency on an idle
farm) to four hours (a long build); one set for every phase, so phases compare."""

MAX_SYSTEM_LABELS = 32
"""Distinct ``system`` label values kept; later ones are counted as ``other``. Systems come
from uploaded derivations: this bounds the series a client could create."""
OTHER_SYSTEM = "other"

ACTIVE_STATES = (StepState.WAITING, StepState.RUNNABLE, StepState.ASSIGNED, StepState.BUILDING)
"""The states ``bigtent_queue_depth`` reports (every step that is not final)."""


class Phase(StrEnum):
    """A phase of a step, the ``phase`` label of ``bigtent_step_phase_seconds``."""

    QUEUED = "queued"
    """From the step's creation to when all its dependencies had succeeded (runnable)."""
    DISPATCH = "dispatch"
    """From runnable (or runnable again, or a retry's not-before time) to assigned: the
    dispatch latency."""
    ACCEPT = "accept"
    """From the assign to the venue's ``accepted`` (building)."""
    PREPARE = "prepare"
    """The agent substituting the step's inputs (its reported ``prepare_secs``)."""
    BUILD = "build"
    """The build itself (the venue's reported ``build_secs``)."""
    UPLOAD = "upload"
    """Uploading the outputs to the cache (the venue's reported ``upload_secs``)."""


class AuthFailure(StrEnum):
    """Why a credential was refused, the ``reason`` label of ``bigtent_auth_failures_total``."""

    MISSING = "missing_credential"
    INVALID_TOKEN = "invalid_token"
    FORBIDDEN = "forbidden"
    """A valid token whose role may not do this."""
    OIDC_REJECTED = "oidc_rejected"
    """An OIDC ID token refused: malformed, badly signed, expired, or denied by the rules."""
    OIDC_UNAVAILABLE = "oidc_unavailable"
    """The issuer's keys could not be fetched (the agent may try again)."""
    RATE_LIMITED = "rate_limited"
    """The address had too many recent failures; its credential was not looked at."""


class UploadKind(StrEnum):
    """Which door a NAR came in by, the ``kind`` label of the upload metrics."""

    SOURCE = "source"
    """A client's ``.drv`` files and sources (``PUT /api/v1/paths/...``)."""
    OUTPUT = "output"
    """A build output, from an agent or an SSH builder."""


class UploadFailure(StrEnum):
    """Why a NAR failed verification while it streamed in."""

    TOO_LARGE = "too_large"
    """Larger than declared or than ``cache.max_nar_bytes``."""
    NAR_MISMATCH = "nar_mismatch"
    """Not what its headers declared: another hash, shorter, or not a well-formed NAR."""
    REJECTED = "rejected"
    """Refused for its content in another way (e.g. a ``.drv`` too large to parse)."""
    INTERRUPTED = "interrupted"
    """The upload stopped before its end (the peer went away)."""


class Lifetime(StrEnum):
    PERSISTENT = "persistent"
    EPHEMERAL = "ephemeral"


class AuthKind(StrEnum):
    """How an agent authenticated: the agent row's ``auth_kind``."""

    TOKEN = "token"
    OIDC = "oidc"


AGENT_KINDS = (
    (Lifetime.PERSISTENT, AuthKind.TOKEN),
    (Lifetime.EPHEMERAL, AuthKind.TOKEN),
    (Lifetime.EPHEMERAL, AuthKind.OIDC),
)
"""The kinds of agent there are (an OIDC agent is always ephemeral, architecture §6)."""


class CacheLookup(StrEnum):
    HIT = "hit"
    MISS = "miss"


# ---- pure decisions ----------------------------------------------------------------------------
def auth_failure_reason(exc: AuthError, credential: str | None) -> AuthFailure:
    """The reason label for a refused credential. ``credential`` is what the peer presented
    (None or empty: nothing). Checked most specific first: a rate-limited address is refused
    before its credential is looked at, and an OIDC policy denial is also a 403."""
    if isinstance(exc, TooManyAuthFailures):
        return AuthFailure.RATE_LIMITED
    if isinstance(exc, IssuerUnavailable):
        return AuthFailure.OIDC_UNAVAILABLE
    if isinstance(exc, InvalidToken | PolicyDenied):
        return AuthFailure.OIDC_REJECTED
    if exc.http_status == 403:
        return AuthFailure.FORBIDDEN
    if not credential:
        return AuthFailure.MISSING
    return AuthFailure.INVALID_TOKEN


def upload_failure_reason(exc: BaseException) -> UploadFailure:
    """The reason label for an upload whose verification raised ``exc``."""
    if isinstance(exc, PayloadTooLarge):
        return UploadFailure.TOO_LARGE
    if isinstance(exc, NarMismatch):
        return UploadFailure.NAR_MISMATCH
    if isinstance(exc, BigtentError):
        return UploadFailure.REJECTED
    return UploadFailure.INTERRUPTED


def reported_phases(timings: Timings) -> list[tuple[Phase, float]]:
    """The phases a venue's result timings report. A phase that did not run is reported as 0
    and is not observed; a value that is negative or not finite (the timings come from the
    agent) is not observed either."""
    values = [
        (Phase.PREPARE, timings.prepare_secs),
        (Phase.BUILD, timings.build_secs),
        (Phase.UPLOAD, timings.upload_secs),
    ]
    return [(phase, secs) for phase, secs in values if math.isfinite(secs) and secs > 0]


def queue_depth(nodes: Iterable[StepNode]) -> Counter[tuple[str, StepState]]:
    """Steps that are not final, by (system, state). The scheduler also keeps the final
    steps of builds still running: those are not counted."""
    # Counted in C (a generator into Counter), then the few final keys dropped: a scrape
    # with 100 000 active steps costs ~25 ms of the event loop, not ~50.
    depth = Counter((node.req.system, node.state) for node in nodes)
    for key in [k for k in depth if k[1].is_final]:
        del depth[key]
    return depth


class SessionView(Protocol):
    """What the collector reads of a live agent session (``sessions.AgentSession``)."""

    @property
    def closed(self) -> bool: ...
    @property
    def venue(self) -> object | None: ...
    @property
    def identity(self) -> object | None: ...
    @property
    def record(self) -> dict[str, object]: ...


def agent_kinds(sessions: Iterable[SessionView]) -> Counter[tuple[Lifetime, AuthKind]]:
    """Registered, open agent sessions by lifetime and credential. An OIDC agent is always
    ephemeral (its row says so, architecture §6)."""
    kinds: Counter[tuple[Lifetime, AuthKind]] = Counter()
    for s in sessions:
        if s.closed or s.venue is None:
            continue
        lifetime = Lifetime.EPHEMERAL if s.record.get("ephemeral") else Lifetime.PERSISTENT
        auth = AuthKind.TOKEN if s.identity is None else AuthKind.OIDC
        kinds[lifetime, auth] += 1
    return kinds


class SystemLabels:
    """The ``system`` label values in use: the first ``limit`` systems seen keep their own
    label, later ones share ``other`` (a bound on the series an uploaded derivation can make)."""

    def __init__(self, limit: int = MAX_SYSTEM_LABELS) -> None:
        self.limit = limit
        self.known: list[str] = []
        self._set: set[str] = set()

    def label(self, system: str) -> tuple[str, bool]:
        """The label for ``system`` and whether it is new (its series should be made)."""
        if system in self._set:
            return system, False
        if len(self.known) >= self.limit:
            system = OTHER_SYSTEM
            if system in self._set:
                return system, False
        self.known.append(system)
        self._set.add(system)
        return system, True


# ---- the metrics -------------------------------------------------------------------------------
class Metrics:
    """Every metric of one runner, in its own registry. Built once in ``components`` and
    handed to the parts that count; a part built without one (in tests) makes its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.systems = SystemLabels()
        self._steps: Callable[[], Iterable[StepNode]] = lambda: ()
        self._sessions: Callable[[], Iterable[SessionView]] = lambda: ()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Info(f"{PREFIX}_runner", "The runner's version.", registry=r).info({"version": __version__})
        r.register(_StateCollector(self))
        self.steps_finished = PromCounter(
            f"{PREFIX}_steps_finished",
            "Step attempts that ended, by system and outcome (a retried step counts once "
            "per attempt).",
            ["system", "outcome"],
            registry=r,
        )
        self.step_phase = Histogram(
            f"{PREFIX}_step_phase_seconds",
            "How long steps spent in each phase, by system and phase.",
            ["system", "phase"],
            buckets=PHASE_BUCKETS_SECS,
            registry=r,
        )
        self.logs_expired = PromCounter(
            f"{PREFIX}_step_logs_expired",
            "Step logs deleted by retention (scheduler.log_retention_days).",
            registry=r,
        )
        self.agents_without_room = Gauge(
            f"{PREFIX}_agents_without_room",
            "Connected agents whose last heartbeat reported less free store disk than "
            "scheduler.min_free_store_bytes: they get no new steps.",
            registry=r,
        )
        self.auth_failures = PromCounter(
            f"{PREFIX}_auth_failures",
            "Refused credentials (HTTP API, agent WebSocket, uploads, /metrics), by reason.",
            ["reason"],
            registry=r,
        )
        self.upload_bytes = PromCounter(
            f"{PREFIX}_upload_nar_bytes",
            "NAR bytes received and verified (declared hash and size), by kind.",
            ["kind"],
            registry=r,
        )
        self.uploads_verified = PromCounter(
            f"{PREFIX}_uploads_verified",
            "NARs received and verified, by kind.",
            ["kind"],
            registry=r,
        )
        self.upload_failures = PromCounter(
            f"{PREFIX}_upload_failures",
            "NARs that failed verification while they streamed in, by kind and reason.",
            ["kind", "reason"],
            registry=r,
        )
        self.storage_full = PromCounter(
            f"{PREFIX}_storage_full",
            "NARs refused because the NAR storage was full (answered 507; alert on it).",
            registry=r,
        )
        self.nars_forgotten = PromCounter(
            f"{PREFIX}_cache_nars_forgotten",
            "Paths forgotten from the cache because their NAR file was missing or bad.",
            registry=r,
        )
        self.narinfo_requests = PromCounter(
            f"{PREFIX}_cache_narinfo_requests",
            "narinfo lookups served by /cache, by result (hit: the cache has the path).",
            ["result"],
            registry=r,
        )
        # The autoscaler (architecture §1, [[autoscale.github]]) calls these; ``pool`` is the
        # configured pool name.
        self.autoscaler_launches = PromCounter(
            f"{PREFIX}_autoscaler_launches",
            "Autoscaler: ephemeral agents launched (workflow_dispatch accepted), by pool.",
            ["pool"],
            registry=r,
        )
        self.autoscaler_registrations = PromCounter(
            f"{PREFIX}_autoscaler_registrations",
            "Autoscaler: launched agents that registered with the runner, by pool.",
            ["pool"],
            registry=r,
        )
        self.autoscaler_expiries = PromCounter(
            f"{PREFIX}_autoscaler_expiries",
            "Autoscaler: launches that never registered within launch_ttl_secs, by pool.",
            ["pool"],
            registry=r,
        )
        self.autoscaler_dispatch_failures = PromCounter(
            f"{PREFIX}_autoscaler_dispatch_failures",
            "Autoscaler: workflow_dispatch calls that failed, by pool.",
            ["pool"],
            registry=r,
        )
        # Reporting to forges (runner/forge, docs/ci.md): ``forge`` is github, forgejo or
        # gitea; ``outcome`` sent, failed (retried), rate_limited (retried later) or refused
        # (for good: 400, 404, 410, 422).
        self.forge_calls = PromCounter(
            f"{PREFIX}_forge_calls",
            "Calls to forges (check runs, commit statuses), by forge and outcome.",
            ["forge", "outcome"],
            registry=r,
        )
        for forge in ("github", "forgejo", "gitea"):
            for outcome in ("sent", "failed", "rate_limited", "refused"):
                self.forge_calls.labels(forge, outcome)
        self.recovery_failures = Gauge(
            f"{PREFIX}_scheduler_recovery_failures",
            "Consecutive failed reloads of the scheduler's state from the database (0: the "
            "scheduler is sound; above 0 nothing is dispatched and /healthz fails).",
            registry=r,
        )
        self.recoveries_failed = PromCounter(
            f"{PREFIX}_scheduler_recoveries_failed",
            "Reloads of the scheduler's state from the database that failed.",
            registry=r,
        )
        # Cache retention (docs/cache.md); ``cache`` is ``main`` or ``untrusted``.
        self.cache_bytes = Gauge(
            f"{PREFIX}_cache_bytes",
            "Bytes of NAR files in the cache (each file once), by cache; refreshed every "
            "cache.retention.usage_flush_secs and after each collection.",
            ["cache"],
            registry=r,
        )
        self.cache_paths = Gauge(
            f"{PREFIX}_cache_paths", "Paths in the cache, by cache.", ["cache"], registry=r
        )
        self.cache_quota = Gauge(
            f"{PREFIX}_cache_quota_bytes",
            "The cache's quota (high watermark) in bytes, by cache; 0: no quota.",
            ["cache"],
            registry=r,
        )
        self.gc_deleted = PromCounter(
            f"{PREFIX}_cache_gc_paths_deleted",
            "Paths a collection deleted, by cache and reason (idle, quota).",
            ["cache", "reason"],
            registry=r,
        )
        self.gc_freed = PromCounter(
            f"{PREFIX}_cache_gc_bytes_freed",
            "Bytes of NAR files collections deleted, by cache.",
            ["cache"],
            registry=r,
        )
        self.gc_roots = Gauge(
            f"{PREFIX}_cache_gc_roots",
            "Paths the last collection kept as roots, by cache and kind (pin, build, active, "
            "referenced, grace).",
            ["cache", "kind"],
            registry=r,
        )
        self.gc_kept = Gauge(
            f"{PREFIX}_cache_gc_kept_paths",
            "Paths the last collection kept, by cache and why (rooted: in a root's closure; "
            "recent: used within max_idle_days).",
            ["cache", "policy"],
            registry=r,
        )
        self.gc_last = Gauge(
            f"{PREFIX}_cache_gc_last_run_timestamp_seconds",
            "When the last collection (not a dry run) of this runner finished.",
            registry=r,
        )
        self.gc_last_duration = Gauge(
            f"{PREFIX}_cache_gc_last_duration_seconds",
            "How long the last collection of this runner took.",
            registry=r,
        )
        for cache in ("main", "untrusted"):
            self.gc_freed.labels(cache)
            for gc_reason in ("idle", "quota"):
                self.gc_deleted.labels(cache, gc_reason)
        for reason in AuthFailure:
            self.auth_failures.labels(reason)
        for kind in UploadKind:
            self.upload_bytes.labels(kind)
            self.uploads_verified.labels(kind)
            for failure in UploadFailure:
                self.upload_failures.labels(kind, failure)
        self._narinfo_hit = self.narinfo_requests.labels(CacheLookup.HIT)
        self._narinfo_miss = self.narinfo_requests.labels(CacheLookup.MISS)

    # ---- wiring ---------------------------------------------------------------------------------
    def watch_steps(self, steps: Callable[[], Iterable[StepNode]]) -> None:
        """Where the queue depth is read from at scrape time (the scheduler's steps)."""
        self._steps = steps

    def watch_sessions(self, sessions: Callable[[], Iterable[SessionView]]) -> None:
        """Where connected agents are read from at scrape time (the live sessions)."""
        self._sessions = sessions

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition for a scrape, in the format ``accept`` asks for (Prometheus text by
        default, OpenMetrics on request), and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def system(self, system: str) -> str:
        """The ``system`` label for ``system``; a new one gets its step series at zero."""
        label, new = self.systems.label(system)
        if new:
            for outcome in Outcome:
                self.steps_finished.labels(label, outcome)
            for phase in Phase:
                self.step_phase.labels(label, phase)
        return label

    # ---- steps (the scheduler) ------------------------------------------------------------------
    def observe_phase(self, system: str, phase: Phase, secs: float) -> None:
        self.step_phase.labels(self.system(system), phase).observe(max(0.0, secs))

    def step_runnable(self, node: StepNode, now: float) -> None:
        """``node`` left ``waiting`` (its dependencies succeeded, or it had none): observe the
        ``queued`` phase; its dispatch latency counts from ``now``."""
        node.runnable_at = now
        self.observe_phase(node.req.system, Phase.QUEUED, now - node.created_at)

    def step_requeued(self, node: StepNode, eligible_at: float) -> None:
        """``node`` is runnable again (a retry, a refusal, a failed send): its next dispatch
        latency counts from ``eligible_at`` (a retry's not-before time, or now)."""
        node.runnable_at = eligible_at
        node.assigned_at = None

    def step_assigned(self, node: StepNode, now: float) -> None:
        """``node`` was assigned to a venue: observe the dispatch latency (unless it became
        runnable before this runner started, when that moment is unknown)."""
        if node.runnable_at is not None:
            self.observe_phase(node.req.system, Phase.DISPATCH, now - node.runnable_at)
        node.runnable_at = None
        node.assigned_at = now

    def step_accepted(self, node: StepNode, now: float) -> None:
        """The venue accepted ``node``'s assignment: observe the ``accept`` phase."""
        if node.assigned_at is not None:
            self.observe_phase(node.req.system, Phase.ACCEPT, now - node.assigned_at)
        node.assigned_at = None

    def step_finished(self, node: StepNode, outcome: Outcome, timings: Timings | None) -> None:
        """An attempt of ``node`` ended with ``outcome``; ``timings`` are the venue's report
        (None when there was no result, e.g. a lease that expired)."""
        system = self.system(node.req.system)
        self.steps_finished.labels(system, outcome).inc()
        if timings is not None:
            for phase, secs in reported_phases(timings):
                self.step_phase.labels(system, phase).observe(secs)

    # ---- auth ---------------------------------------------------------------------------------
    def auth_failed(self, exc: AuthError, credential: str | None) -> None:
        """A credential (``credential``: what was presented, None for nothing) was refused."""
        self.auth_failures.labels(auth_failure_reason(exc, credential)).inc()

    # ---- the cache ----------------------------------------------------------------------------
    def upload_verified(self, kind: UploadKind, nar_bytes: int) -> None:
        self.uploads_verified.labels(kind).inc()
        self.upload_bytes.labels(kind).inc(nar_bytes)

    def upload_failed(self, kind: UploadKind, exc: BaseException) -> None:
        """A NAR of ``kind`` failed verification (or stopped) with ``exc``."""
        self.upload_failures.labels(kind, upload_failure_reason(exc)).inc()

    def storage_full_refused(self) -> None:
        """An upload found the NAR storage full (``StorageFull``)."""
        self.storage_full.inc()

    def nar_forgotten(self) -> None:
        """A path was forgotten: its NAR file was missing or bad (``Cache.forget``)."""
        self.nars_forgotten.inc()

    def narinfo_served(self, *, hit: bool) -> None:
        """``/cache`` answered a narinfo request: with the narinfo (hit) or 404 (miss)."""
        (self._narinfo_hit if hit else self._narinfo_miss).inc()

    # ---- cache retention ---------------------------------------------------------------------
    def cache_size(self, cache: str, paths: int, size: int, quota: int | None) -> None:
        self.cache_paths.labels(cache).set(paths)
        self.cache_bytes.labels(cache).set(size)
        self.cache_quota.labels(cache).set(quota or 0)

    def gc_finished(
        self,
        cache: str,
        deleted: Mapping[str, int],
        freed: int,
        roots: Mapping[str, int],
        kept: Mapping[str, int],
    ) -> None:
        """A collection of ``cache`` ended: paths deleted by reason, bytes freed, roots by
        kind and kept paths by policy."""
        for reason, n in deleted.items():
            self.gc_deleted.labels(cache, reason).inc(n)
        self.gc_freed.labels(cache).inc(freed)
        for kind, n in roots.items():
            self.gc_roots.labels(cache, kind).set(n)
        for policy, n in kept.items():
            self.gc_kept.labels(cache, policy).set(n)

    def gc_ran(self, finished_at: float, secs: float) -> None:
        self.gc_last.set(finished_at)
        self.gc_last_duration.set(secs)

    # ---- the autoscaler ----------------------------------------------------------------------
    def autoscaler_pools(self, pools: Sequence[str]) -> None:
        """Make the autoscaler series of the configured ``pools`` (at zero) at start."""
        for pool in pools:
            self.autoscaler_launches.labels(pool)
            self.autoscaler_registrations.labels(pool)
            self.autoscaler_expiries.labels(pool)
            self.autoscaler_dispatch_failures.labels(pool)

    def autoscaler_launched(self, pool: str) -> None:
        """Autoscaler: a workflow_dispatch for ``pool`` was accepted (one agent launched)."""
        self.autoscaler_launches.labels(pool).inc()

    def autoscaler_registered(self, pool: str) -> None:
        """Autoscaler: an agent launched for ``pool`` registered (matched by launch id)."""
        self.autoscaler_registrations.labels(pool).inc()

    def scheduler_recovery(self, failure: RecoveryFailure | None) -> None:
        """The scheduler's reload from the database failed once more (``failure``) or
        succeeded (None)."""
        if failure is None:
            self.recovery_failures.set(0)
        else:
            self.recovery_failures.set(failure.failures)
            self.recoveries_failed.inc()

    def autoscaler_launch_expired(self, pool: str) -> None:
        """Autoscaler: a launch for ``pool`` did not register within its TTL."""
        self.autoscaler_expiries.labels(pool).inc()

    def forge_call(self, forge: str, outcome: str) -> None:
        """A call to a forge ended: ``outcome`` sent, failed, rate_limited or refused."""
        self.forge_calls.labels(forge, outcome).inc()

    def autoscaler_dispatch_failed(self, pool: str) -> None:
        """Autoscaler: a workflow_dispatch call for ``pool`` failed (error or non-2xx)."""
        self.autoscaler_dispatch_failures.labels(pool).inc()


class _StateCollector(Collector):
    """Gauges computed at scrape time from the scheduler's and the sessions' own state."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                f"{PREFIX}_queue_depth",
                "Steps that are not finished, by system and state (waiting for dependencies, "
                "runnable, assigned, building).",
                labels=["system", "state"],
            ),
            GaugeMetricFamily(
                f"{PREFIX}_agents_connected",
                "Agents with a registered session, by lifetime (persistent, ephemeral) and "
                "credential (token, oidc).",
                labels=["lifetime", "auth_kind"],
            ),
        )

    def collect(self) -> Iterator[Metric]:
        queue, agents = self._families()
        m = self.metrics
        depth: Counter[tuple[str, StepState]] = Counter()
        for (system, state), n in queue_depth(m._steps()).items():
            depth[m.system(system), state] += n
        for system in m.systems.known:  # every system seen stays, at zero when idle
            for state in ACTIVE_STATES:
                queue.add_metric([system, state], depth[system, state])
        yield queue
        kinds = agent_kinds(m._sessions())
        for lifetime, auth in AGENT_KINDS:
            agents.add_metric([lifetime, auth], kinds[lifetime, auth])
        yield agents
