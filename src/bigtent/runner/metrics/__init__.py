"""The runner's Prometheus metrics (docs/metrics.md): every metric object lives in this
package, defined by area: ``steps`` (attempts, phases, queue depth, connected agents),
``cache`` (uploads, narinfo lookups, retention), ``services`` (auth, autoscaler, forges, the
scheduler's recovery); ``labels`` holds the label values and the pure decisions.

Each runner has its own ``CollectorRegistry``; nothing is registered in prometheus-client's
global default registry, so several runners can live in one process (tests do). The rest of
the runner calls the small typed methods of ``Metrics`` (``step_finished``, ``auth_failed``,
...); what is a *state* rather than an event (queue depth, connected agents) is read from the
scheduler and the sessions when ``/metrics`` is scraped, by a custom collector, so it can
never drift from the scheduler's own view.

The decisions (which reason an auth failure counts as, which phases an agent's timings
report, how deep the queue is) are pure functions in ``labels``, driven by the unit tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from bigtent import __version__
from bigtent.runner.metrics.cache import CacheMetrics
from bigtent.runner.metrics.labels import (
    ACTIVE_STATES,
    AGENT_KINDS,
    MAX_SYSTEM_LABELS,
    OTHER_SYSTEM,
    PHASE_BUCKETS_SECS,
    PREFIX,
    AuthFailure,
    AuthKind,
    CacheLookup,
    Lifetime,
    Phase,
    SessionView,
    SystemLabels,
    UploadFailure,
    UploadKind,
    agent_kinds,
    auth_failure_reason,
    queue_depth,
    reported_phases,
    upload_failure_reason,
)
from bigtent.runner.metrics.services import ServiceMetrics
from bigtent.runner.metrics.steps import StateCollector, StepMetrics
from bigtent.runner.scheduler.steps import StepNode

__all__ = [
    "ACTIVE_STATES",
    "AGENT_KINDS",
    "MAX_SYSTEM_LABELS",
    "OTHER_SYSTEM",
    "PHASE_BUCKETS_SECS",
    "PREFIX",
    "AuthFailure",
    "AuthKind",
    "CacheLookup",
    "Lifetime",
    "Metrics",
    "Phase",
    "SessionView",
    "SystemLabels",
    "UploadFailure",
    "UploadKind",
    "agent_kinds",
    "auth_failure_reason",
    "queue_depth",
    "reported_phases",
    "upload_failure_reason",
]


class Metrics(StepMetrics, ServiceMetrics, CacheMetrics):
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
        r.register(StateCollector(self))
        # In this order, the order of the exposition.
        self._define_steps(r)
        self._define_auth(r)
        self._define_cache(r)
        self._define_services(r)
        self._define_retention(r)

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
