"""The answers of the runner's ``/api/v1`` that both sides type: the runner's routes answer
with these models and the client (``client/api.py``) parses them, so one definition says
what each answer holds (docs/api.md).

Lenient for the client: unknown fields are ignored and most fields have a default, so a
client reads a runner that answers a little more or less than it knows.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


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
