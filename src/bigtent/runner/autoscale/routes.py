"""``GET /api/v1/launches`` (admin): the autoscaler's pools and launches (docs/api.md)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from bigtent.runner.autoscale.service import counters_total
from bigtent.runner.db import queries
from bigtent.runner.http.deps import AdminAuth, Comps, iso

launch_routes = APIRouter(prefix="/api/v1")


@launch_routes.get("/launches")
async def list_launches(
    comps: Comps,
    _: AdminAuth,
    limit: int = Query(default=100, ge=1, le=1000),
    pool: str | None = Query(default=None, max_length=128),
) -> dict[str, Any]:
    """Launches newest first, with each pool's last plan, cooldown and counters."""
    now = comps.scheduler.clock()
    scaler = comps.autoscaler
    pools = scaler.describe(now) if scaler is not None else []
    for p in pools:
        p["cooldown_until"] = iso(p["cooldown_until"])
    async with comps.engine.connect() as conn:
        rows = await queries.fetch_launches(conn, limit=limit, pool=pool)
    return {
        "pools": pools,
        "counters": counters_total(scaler.counters() if scaler is not None else {}),
        "ticks": scaler.ticks if scaler is not None else 0,
        "launches": [
            {
                "launch_id": r.launch_id,
                "pool": r.pool,
                "state": r.state,
                "created_at": iso(r.created_at),
                "updated_at": iso(r.updated_at),
                "agent_machine_id": r.agent_machine_id,
                "agent_name": r.agent_name,
                "error": r.error,
            }
            for r in rows
        ],
    }
