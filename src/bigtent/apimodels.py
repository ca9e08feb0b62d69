"""The answers of the runner's ``/api/v1`` that both sides type: the runner's routes answer
with these models and the client (``client/api.py``) parses them, so one definition says
what each answer holds (docs/api.md).

Lenient for the client: unknown fields are ignored and most fields have a default, so a
client reads a runner that answers a little more or less than it knows.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict

from bigtent.states import BuildState


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# ---- agents and SSH builders (GET /agents, GET /builders, POST /agents/{name}/drain) ------
class AgentOidc(ApiModel):
    """The CI job an OIDC-authenticated agent's ID token named (architecture §6)."""

    issuer: str
    repository: str
    subject: str
    workflow_ref: str | None = None
    ref: str | None = None


class Agent(ApiModel):
    machine_id: str
    name: str = ""
    hostname: str = ""
    systems: list[str] = []
    supported_features: list[str] = []
    mandatory_features: list[str] = []
    max_jobs: int = 0
    running: int = 0
    speed_factor: float = 1.0
    ephemeral: bool = False
    trusted: bool = True
    """An untrusted venue takes only steps of untrusted builds."""
    build_repositories: list[str] | None = None
    """The build repositories an OIDC agent serves; None: any."""
    auth_kind: str = ""
    """``token`` or ``oidc``."""
    oidc: AgentOidc | None = None
    """Set when ``auth_kind`` is ``oidc``."""
    launch_id: str | None = None
    version: str = ""
    connected: bool = False
    draining: bool = False
    free_store_bytes: int | None = None
    """Free bytes in its Nix store as of its last heartbeat (None while not connected)."""
    has_room: bool = True
    """Its store has ``scheduler.min_free_store_bytes`` free: it gets new steps."""
    first_seen: str | None = None
    last_seen: str | None = None
    steps_succeeded: int = 0
    steps_failed: int = 0
    infra_failures: int = 0
    consecutive_failures: int = 0
    backoff_until: str | None = None
    """Set while the agent gets no work after consecutive infrastructure failures."""
    unhealthy: bool = False
    """``scheduler.unhealthy_after_failures`` consecutive infrastructure failures: one step at a
    time after its backoff until one succeeds (docs/agents.md)."""
    last_error: str | None = None
    """The last infrastructure failure of its current run of failures."""


class Agents(ApiModel):
    agents: list[Agent]


class Builder(ApiModel):
    """An SSH remote builder (``[[ssh_builders]]``) as the runner reports it. A skipped one
    has only ``machine_id``, ``uri``, ``kind``, ``usable`` and ``reason``."""

    machine_id: str
    uri: str
    kind: str = "ssh"
    usable: bool
    reason: str | None = None
    """Why the runner does not use it (e.g. no pinned host key)."""
    systems: list[str] = []
    supported_features: list[str] = []
    mandatory_features: list[str] = []
    max_jobs: int = 0
    running: int = 0
    speed_factor: float = 1.0
    consecutive_failures: int = 0
    backoff_until: str | None = None
    in_backoff: bool = False


class Builders(ApiModel):
    builders: list[Builder]


class Drained(ApiModel):
    drained: str
    """The name of the agent told to drain."""


# ---- tokens (GET/POST /tokens, DELETE /tokens/{name}) ------------------------------------
class TokenInfo(ApiModel):
    """A token stored in the runner's database (the answer never holds its digest)."""

    name: str
    role: str
    trusted: bool = False
    created_by: str = ""
    created_at: str | None = None
    revoked_at: str | None = None


class CreatedToken(TokenInfo):
    token: str
    """The secret: in this answer and nowhere else."""


class Tokens(ApiModel):
    tokens: list[TokenInfo]


# ---- the cache (POST /paths/missing) ------------------------------------------------------
class Missing(ApiModel):
    missing: list[str]
    """The asked paths the cache does not have, in the order asked."""


# ---- builds, steps, attempts (GET/POST /builds…, GET /steps/{id}) -------------------------
# Ids are integers on the wire. The runner answers a field marked "only in …" in those
# answers alone: its routes leave out what they did not set (``response_model_exclude_unset``),
# and the client reads the default when it is absent.
class StepCounts(ApiModel):
    """A build's steps by state: assigned and building ones count as running, failed and
    dependency-failed ones as failed."""

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
    step_id: int | None = None
    """None when the derivation's outputs were already cached."""
    state: str = ""
    """Its step's state, or ``cached`` when it needed no step."""


class CachedFailure(ApiModel):
    """A step this build failed from the failure cache: when, the failure it reused (the
    attempt that ran, and the build that queued that run, when known), until when it is
    reused."""

    hit_at: str | None = None
    failed_at: str | None = None
    outcome: str = ""
    cached_until: str | None = None
    attempt_id: int | None = None
    agent_name: str | None = None
    ran_in_build: int | None = None


class FailedStep(ApiModel):
    id: int
    drv_path: str
    state: str = ""
    outcome: str | None = None
    error: str | None = None
    log_tail: str | None = None
    cached_failure: CachedFailure | None = None
    """Only for a cached-failure hit."""


class WaitingStep(ApiModel):
    """A runnable step that no venue can take (``waiting for capacity: …``)."""

    step_id: int
    drv_path: str
    name: str = ""
    system: str = ""
    required_features: list[str] = []
    reason: str | None = None
    since: str | None = None


class BuildEvent(ApiModel):
    """One entry of a build's history (cancelled, bumped, restarted, replaced…)."""

    id: int
    at: str | None = None
    kind: str
    actor: str = ""
    detail: str | None = None


class Build(ApiModel):
    id: int
    state: BuildState
    priority: int = 0
    created_at: str | None = None
    finished_at: str | None = None
    created_by: str = ""
    repository: str | None = None
    ref: str | None = None
    trusted: bool = True
    """An untrusted build's outputs are in the untrusted cache, not the main one."""
    roots: list[BuildRoot] = []
    counts: StepCounts = StepCounts()
    waiting_for_capacity_count: int = 0
    events: list[BuildEvent] = []
    """Only in ``GET /builds/{id}``: its newest events, oldest first."""
    waiting_for_capacity: list[WaitingStep] = []
    """Only in ``GET /builds/{id}``: the first of them, longest waiting first."""
    failed_steps: list[FailedStep] = []
    """Only in ``GET /builds/{id}``."""

    def progress_token(self) -> str:
        """What ``GET /builds/{id}?seen=`` names: this build's state and step counts."""
        return progress_token(self.state.value, self.counts.model_dump())


PROGRESS_COUNTS = ("total", "waiting", "runnable", "running", "succeeded", "failed", "cancelled")
"""The step counts a progress token holds, in its order."""


def progress_token(state: str, counts: Mapping[str, int]) -> str:
    """A build's state and step counts as one short string, e.g. ``running.9.2.1.2.4.0.0``:
    a client that saw it asks ``GET /builds/{id}?wait=&seen=`` for the build once it differs
    (pure; the runner compares its own answer's, so both sides compute it here)."""
    return ".".join([state, *(str(counts.get(name, 0)) for name in PROGRESS_COUNTS)])


def seen_counts_steps(seen: str) -> bool:
    """Whether ``seen``, a build's progress as a client last saw it, is a whole progress token
    (its state and step counts: a step's change is news) rather than a state alone (pure)."""
    return "." in seen


def progress_seen(token: str, seen: str) -> bool:
    """Whether a build whose progress token is ``token`` is as the client saw it: ``seen`` is
    a progress token, or a state alone (then only the state counts: ``seen_counts_steps``)
    (pure)."""
    if seen_counts_steps(seen):
        return token == seen
    return token.split(".", 1)[0] == seen


WAITED_HEADER = "Bigtent-Waited"
"""Set on a ``GET /builds/{id}?wait=`` answer by a runner that waited (the seconds it would
have): a client told nothing of the kind (an older runner answered at once) pauses before
it looks again."""


class StepAttempt(ApiModel):
    """One attempt of a step (docs/api.md "Attempts"): which venue ran it, how it ended,
    why, and when the step will be tried again (``retry_at`` None: the outcome was final)."""

    id: int
    step_id: int
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
    log_expired: bool = False
    """Retention deleted its log."""
    id: int
    drv_path: str
    name: str = ""
    system: str = ""
    required_features: list[str] = []
    state: str = ""
    outcome: str | None = None
    error: str | None = None
    exit_code: int | None = None
    attempts: int = 0
    agent_name: str | None = None
    trusted: bool = True
    created_at: str | None = None
    assigned_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    outputs: dict[str, str] = {}
    waiting_reason: str | None = None
    """Set while the step is runnable but no venue can take it."""
    cached_failure: CachedFailure | None = None
    """Only in ``GET /builds/{id}/steps``, for a step the build failed from the failure
    cache."""
    attempt_records: list[StepAttempt] = []
    """Only in ``GET /steps/{id}``: its attempts, oldest first."""


class BuildList(ApiModel):
    builds: list[Build]


class StepList(ApiModel):
    steps: list[Step]


class AttemptList(ApiModel):
    attempts: list[StepAttempt]


# ---- the runner (GET /status) -------------------------------------------------------------
class UpstreamInfo(ApiModel):
    url: str
    public_key: str = ""


class SchedulerHealth(ApiModel):
    """Whether the scheduler is sound: while reloading its state from the database fails, it
    dispatches nothing. The other fields are only there while it is not healthy."""

    healthy: bool = True
    problem: str | None = None
    recovery_failures: int = 0
    failing_since: str | None = None
    next_retry_at: str | None = None
    database_error: str | None = None


class RunnerStatus(ApiModel):
    version: str = ""
    cache_url: str = ""
    cache_public_key: str = ""
    untrusted_cache_url: str | None = None
    """The runner's untrusted cache (outputs of untrusted builds); None from older runners."""
    untrusted_cache_public_key: str | None = None
    upstreams: list[UpstreamInfo] = []
    steps: dict[str, int] | None = {}
    """Steps by state; None while the database does not answer."""
    queue: dict[str, int] = {}
    agents_connected: int = 0
    ssh_builders: int = 0
    builds_active: int = 0
    steps_waiting_for_capacity: int = 0
    """Runnable steps no connected agent, SSH builder or autoscaler pool can take."""
    cache_paths: int | None = None
    """None while the database does not answer (as ``cache_bytes``)."""
    cache_bytes: int | None = None
    scheduler: SchedulerHealth = SchedulerHealth()
