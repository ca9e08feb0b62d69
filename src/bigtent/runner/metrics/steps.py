"""The step metrics: attempts by outcome, time per phase, expired logs, agents without room;
and the gauges read at scrape time from the scheduler and the sessions (queue depth,
connected agents), so they never drift from the scheduler's own view."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from bigtent.protocol import Outcome, Timings
from bigtent.runner.metrics.labels import (
    ACTIVE_STATES,
    AGENT_KINDS,
    PHASE_BUCKETS_SECS,
    PREFIX,
    Phase,
    SessionView,
    SystemLabels,
    agent_kinds,
    queue_depth,
    reported_phases,
)
from bigtent.runner.scheduler.steps import StepNode
from bigtent.states import StepState


class StepMetrics:
    """The step metrics of ``Metrics`` (defined by ``_define_steps``)."""

    systems: SystemLabels
    _steps: Callable[[], Iterable[StepNode]]
    _sessions: Callable[[], Iterable[SessionView]]

    def _define_steps(self, r: CollectorRegistry) -> None:
        """Steps: attempts, phases, expired logs, agents without room."""
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
        # The labelled children, looked up once per label set (``labels`` costs a lock and
        # a dict lookup of its own per call); the ``system`` label bounds both.
        self._finished_children: dict[tuple[str, Outcome], PromCounter] = {}
        self._phase_children: dict[tuple[str, Phase], Histogram] = {}
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

    def system(self, system: str) -> str:
        """The ``system`` label for ``system``; a new one gets its step series at zero."""
        label, new = self.systems.label(system)
        if new:
            for outcome in Outcome:
                self._finished_children[label, outcome] = self.steps_finished.labels(label, outcome)
            for phase in Phase:
                self._phase_children[label, phase] = self.step_phase.labels(label, phase)
        return label

    # ---- steps (the scheduler) ------------------------------------------------------------------
    def observe_phase(self, system: str, phase: Phase, secs: float) -> None:
        self._phase_children[self.system(system), phase].observe(max(0.0, secs))

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
        self._finished_children[system, outcome].inc()
        if timings is not None:
            for phase, secs in reported_phases(timings):
                self._phase_children[system, phase].observe(secs)


class StateCollector(Collector):
    """Gauges computed at scrape time from the scheduler's and the sessions' own state."""

    def __init__(self, metrics: StepMetrics) -> None:
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
