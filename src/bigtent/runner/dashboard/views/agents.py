"""The agents page: every agent row, the SSH builders, autoscaler launches."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bigtent.runner.components import Components
from bigtent.runner.dashboard import present
from bigtent.runner.db import queries
from bigtent.runner.scheduler.health import is_unhealthy, shown_error


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
    live = sched.venue_infos()
    out = []
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
