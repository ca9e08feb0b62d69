"""What the runner's ``/api/v1`` answers, as the client types it (docs/api.md): builds,
steps, attempts, status, pins, launches. Answers both sides type are ``bigtent.apimodels``."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field

from bigtent.apimodels import ApiModel
from bigtent.states import BuildState


def _to_str(value: object) -> object:
    # Ids may be integers or strings on the wire; the client treats them as opaque text.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Id = Annotated[str, BeforeValidator(_to_str)]


class UpstreamInfo(ApiModel):
    url: str
    public_key: str = ""


class RunnerStatus(ApiModel):
    version: str = ""
    cache_url: str = ""
    cache_public_key: str = ""
    untrusted_cache_url: str | None = None
    """The runner's untrusted cache (outputs of untrusted builds); None from older runners."""
    untrusted_cache_public_key: str | None = None
    upstreams: list[UpstreamInfo] = []
    steps: dict[str, int] = {}
    agents_connected: int = 0
    builds_active: int = 0
    steps_waiting_for_capacity: int = 0
    """Runnable steps no connected agent, SSH builder or autoscaler pool can take."""


class StepCounts(ApiModel):
    total: int = 0
    waiting: int = 0
    runnable: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0


class BuildRoot(ApiModel):
    drv_path: str
    outputs: dict[str, str] = {}
    step_id: Id | None = None
    """None when the derivation's outputs were already cached."""
    state: str = ""


class FailedStep(ApiModel):
    id: Id
    drv_path: str
    state: str = ""
    outcome: str | None = None
    error: str | None = None
    log_tail: str | None = None


class WaitingStep(ApiModel):
    """A runnable step that no venue can take (``waiting for capacity: …``)."""

    step_id: Id
    drv_path: str
    name: str = ""
    system: str = ""
    required_features: list[str] = []
    reason: str = ""
    since: str | None = None


class Build(ApiModel):
    id: Id
    state: BuildState
    priority: int = 0
    created_at: str | None = None
    finished_at: str | None = None
    repository: str | None = None
    ref: str | None = None
    trusted: bool = True
    """An untrusted build's outputs are in the untrusted cache, not the main one."""
    roots: list[BuildRoot] = []
    counts: StepCounts = StepCounts()
    failed_steps: list[FailedStep] = []
    """Only present in ``GET /builds/{id}``."""
    waiting_for_capacity_count: int = 0
    waiting_for_capacity: list[WaitingStep] = []
    """The first of them, longest waiting first (only in ``GET /builds/{id}``)."""


class StepAttempt(ApiModel):
    """One attempt of a step (docs/api.md "Attempts"): which venue ran it, how it ended,
    why, and when the step will be tried again (``retry_at`` None: the outcome was final)."""

    id: int
    step_id: Id
    drv_path: str
    name: str = ""
    attempt: int
    max_attempts: int
    agent_name: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    outcome: str
    error: str | None = None
    retry_at: str | None = None


class Step(ApiModel):
    id: Id
    drv_path: str
    name: str = ""
    system: str = ""
    required_features: list[str] = []
    state: str = ""
    outcome: str | None = None
    error: str | None = None
    attempts: int = 0
    agent_name: str | None = None
    trusted: bool = True
    created_at: str | None = None
    assigned_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    outputs: dict[str, str] = {}
    attempt_records: list[StepAttempt] = []
    """Only in ``GET /steps/{id}``: its attempts, oldest first."""
    waiting_reason: str | None = None
    """Set while the step is runnable but no venue can take it."""


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


class BuildList(ApiModel):
    builds: list[Build]


class AttemptList(ApiModel):
    attempts: list[StepAttempt]


class StepList(ApiModel):
    steps: list[Step]


class Uploaded(ApiModel):
    path: str = Field(default="")
