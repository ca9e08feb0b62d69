"""``/api/v1/agents`` and ``/builders``: the venues as the API shows them, drain, the agent
WebSocket."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, WebSocket

from bigtent.apimodels import Agents, Builders, Drained
from bigtent.errors import NotFound
from bigtent.runner.components import Components
from bigtent.runner.db import queries
from bigtent.runner.http.deps import AdminAuth, ClientAuth, Comps, iso
from bigtent.runner.scheduler.health import is_unhealthy, shown_error
from bigtent.runner.scheduler.matching import has_room
from bigtent.runner.scheduler.model import AGENT

router = APIRouter()


@router.get("/agents")
async def list_agents(comps: Comps, _: ClientAuth) -> Agents:
    async with comps.engine.connect() as conn:
        rows = await queries.fetch_agents(conn)
    live = comps.scheduler.venue_infos()
    now = comps.scheduler.clock()
    # With other runners on the database, their agents count as connected while their rows
    # say so and their heartbeats are recent (docs/architecture.md, "Several runners").
    elsewhere_secs = (
        3 * comps.config.scheduler.heartbeat_secs
        if comps.scheduler.overview().shared_database
        else -1.0
    )
    out = []
    for r in rows:
        venue = live.get(r.machine_id)
        # A connected agent's backoff is the scheduler's; a gone one's is its row's, which
        # it gets back when it reconnects.
        backoff = venue.backoff_until if venue else (r.backoff_until or 0.0)
        failures = venue.consecutive_failures if venue else int(r.consecutive_failures)
        out.append(
            {
                "machine_id": r.machine_id,
                "name": r.name,
                "hostname": r.hostname,
                "systems": json.loads(r.systems),
                "supported_features": json.loads(r.supported_features),
                "mandatory_features": json.loads(r.mandatory_features),
                "max_jobs": r.max_jobs,
                "running": venue.running if venue else 0,
                "speed_factor": r.speed_factor,
                "ephemeral": r.ephemeral,
                "trusted": venue.trusted if venue else bool(r.trusted),
                "build_repositories": (
                    sorted(venue.repositories)
                    if venue is not None and venue.repositories is not None
                    else None
                ),
                "auth_kind": r.auth_kind,
                "oidc": _oidc_json(r),
                "launch_id": r.launch_id,
                "version": r.version,
                "connected": venue is not None
                or (bool(r.connected) and now - float(r.last_seen) <= elsewhere_secs),
                "draining": venue.draining if venue else False,
                "free_store_bytes": venue.free_store_bytes if venue else None,
                "has_room": venue is None
                or has_room(venue.free_store_bytes, comps.config.scheduler.min_free_store_bytes),
                "first_seen": iso(r.first_seen),
                "last_seen": iso(r.last_seen),
                "steps_succeeded": r.steps_succeeded,
                "steps_failed": r.steps_failed,
                "infra_failures": r.infra_failures,
                "consecutive_failures": failures,
                "backoff_until": iso(backoff) if backoff > now else None,
                "unhealthy": is_unhealthy(
                    failures, comps.config.scheduler.unhealthy_after_failures
                ),
                "last_error": shown_error(
                    venue.last_error if venue else r.health_last_error, failures
                ),
            }
        )
    return Agents.model_validate({"agents": out})


def _oidc_json(row: Any) -> dict[str, Any] | None:
    """The CI identity an OIDC agent authenticated as; None for a token agent."""
    if row.auth_kind != "oidc":
        return None
    return {
        "issuer": row.oidc_issuer,
        "repository": row.oidc_repository,
        "subject": row.oidc_subject,
        "workflow_ref": row.oidc_workflow_ref,
        "ref": row.oidc_ref,
    }


# A skipped builder has fewer fields: the answer keeps to the ones it has.
@router.get("/builders", response_model_exclude_unset=True)
async def list_builders(comps: Comps, _: ClientAuth) -> Builders:
    """The ``[[ssh_builders]]``: usable ones with their load and backoff, skipped ones with
    the reason (docs/api.md)."""
    now = comps.scheduler.clock()
    builders = comps.ssh.describe(now)
    for b in builders:
        if b.get("backoff_until") is not None:
            b["backoff_until"] = iso(b["backoff_until"])
    return Builders.model_validate({"builders": builders})


@router.post("/agents/{name}/drain")
async def drain_agent(name: str, comps: Comps, _: AdminAuth) -> Drained:
    for venue in comps.scheduler.venue_infos().values():
        if venue.kind == AGENT and (venue.name == name or venue.machine_id == name):
            comps.scheduler.drain(venue.machine_id)
            return Drained(drained=venue.name)
    raise NotFound(f"no connected agent {name!r}")


@router.websocket("/agent/ws")
async def agent_ws(websocket: WebSocket) -> None:
    comps: Components = websocket.app.state.components
    await comps.sessions.handle(websocket)
