"""What the runner's ``/api/v1`` answers that only the client types (docs/api.md): pins,
launches, uploads. Answers both sides type (builds, steps, attempts, status, venues, tokens)
are ``bigtent.apimodels``."""

from __future__ import annotations

from pydantic import Field

from bigtent.apimodels import ApiModel


class PinInfo(ApiModel):
    """A named pin (docs/cache.md)."""

    name: str
    paths: list[str]
    created_at: str | None = None
    created_by: str = ""
    expires_at: str | None = None
    missing: list[str] = []
    """Only in the answer to adding a pin: pinned paths the cache does not hold (yet)."""


class PinList(ApiModel):
    pins: list[PinInfo]


class Launch(ApiModel):
    """One autoscaler launch (docs/autoscaling.md)."""

    launch_id: str
    pool: str
    state: str
    """``pending``, ``registered``, ``expired`` or ``failed``."""
    created_at: str | None = None
    updated_at: str | None = None
    agent_machine_id: str | None = None
    agent_name: str | None = None
    error: str | None = None


class LaunchCounters(ApiModel):
    launches: int = 0
    registrations: int = 0
    expiries: int = 0
    dispatch_failures: int = 0


class LaunchPool(ApiModel):
    """An ``[[autoscale.github]]`` pool with its last plan and counters."""

    name: str
    workflow: str = ""
    systems: list[str] = []
    max_jobs: int = 1
    max_inflight: int = 0
    pending: int = 0
    demand: int = 0
    covered: int = 0
    deficit: int = 0
    cooldown_until: str | None = None
    counters: LaunchCounters = LaunchCounters()


class Launches(ApiModel):
    pools: list[LaunchPool] = []
    counters: LaunchCounters = LaunchCounters()
    ticks: int = 0
    launches: list[Launch] = []


class Uploaded(ApiModel):
    path: str = Field(default="")
