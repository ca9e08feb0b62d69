"""The metrics of the services around the scheduler: refused credentials, the autoscaler's
launches, calls to forges, and the scheduler's reloads from the database."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter

from bigtent.errors import AuthError
from bigtent.runner.metrics.labels import PREFIX, AuthFailure, auth_failure_reason
from bigtent.runner.scheduler.recovery import RecoveryFailure


class ServiceMetrics:
    """Auth, autoscaler, forge and scheduler-recovery metrics of ``Metrics`` (defined by
    ``_define_auth`` and ``_define_services``)."""

    def _define_auth(self, r: CollectorRegistry) -> None:
        """Refused credentials, by reason."""
        self.auth_failures = PromCounter(
            f"{PREFIX}_auth_failures",
            "Refused credentials (HTTP API, agent WebSocket, uploads, /metrics), by reason.",
            ["reason"],
            registry=r,
        )
        for reason in AuthFailure:
            self.auth_failures.labels(reason)

    def _define_services(self, r: CollectorRegistry) -> None:
        """The autoscaler, forges, the scheduler's recovery."""
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

    # ---- auth ---------------------------------------------------------------------------------
    def auth_failed(self, exc: AuthError, credential: str | None) -> None:
        """A credential (``credential``: what was presented, None for nothing) was refused."""
        self.auth_failures.labels(auth_failure_reason(exc, credential)).inc()

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
