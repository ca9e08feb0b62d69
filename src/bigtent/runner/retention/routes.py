"""``/api/v1/pins`` and ``/api/v1/gc`` (docs/api.md, docs/cache.md): pins are listed with any
client token and changed with an admin token; a collection is started with an admin token."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from bigtent.errors import Unavailable
from bigtent.runner.components import Components
from bigtent.runner.db import queries
from bigtent.runner.http.deps import AdminAuth, ClientAuth, Comps, iso
from bigtent.runner.retention.collector import Collector
from bigtent.runner.retention.pins import MAX_PIN_PATHS, Pins, pin_json

retention_routes = APIRouter(prefix="/api/v1")


def _pins(comps: Components) -> Pins:
    if comps.pins is None:
        raise Unavailable("this runner has no cache retention")
    return comps.pins


def _collector(comps: Components) -> Collector:
    if comps.collector is None:
        raise Unavailable("this runner has no cache retention")
    return comps.collector


class PinBody(BaseModel):
    paths: list[str] = Field(min_length=1, max_length=MAX_PIN_PATHS)
    keep_days: float | None = Field(default=None, gt=0, le=36500)


@retention_routes.get("/pins")
async def list_pins(comps: Comps, _: ClientAuth) -> dict[str, Any]:
    pins = await _pins(comps).list(comps.scheduler.clock())
    return {"pins": [_pin_answer(pin_json(p)) for p in pins]}


@retention_routes.put("/pins/{name}")
async def add_pin(name: str, body: PinBody, comps: Comps, who: AdminAuth) -> dict[str, Any]:
    """Create pin ``name`` or replace its paths and expiry."""
    answer = await _pins(comps).add(
        name, body.paths, body.keep_days, by=who.name, now=comps.scheduler.clock()
    )
    return {**_pin_answer(pin_json(answer.pin)), "missing": list(answer.missing)}


@retention_routes.delete("/pins/{name}")
async def remove_pin(name: str, comps: Comps, _: AdminAuth) -> dict[str, Any]:
    await _pins(comps).remove(name)
    return {"removed": name}


def _pin_answer(pin: dict[str, Any]) -> dict[str, Any]:
    return {**pin, "created_at": iso(pin["created_at"]), "expires_at": iso(pin["expires_at"])}


class GcBody(BaseModel):
    dry_run: bool = False


@retention_routes.post("/gc")
async def collect(body: GcBody, comps: Comps, _: AdminAuth) -> dict[str, Any]:
    """Collect both caches now (409 while a collection runs here or on another runner)."""
    report = await _collector(comps).collect(dry_run=body.dry_run, trigger="api")
    return report.as_json()


@retention_routes.get("/gc")
async def gc_status(comps: Comps, _: ClientAuth) -> dict[str, Any]:
    """Each cache's size against its quota, the policy, and the last collection."""
    collector = _collector(comps)
    sizes = await collector.sizes()
    async with comps.engine.connect() as conn:
        last = await queries.last_gc_run(conn)
    retention = comps.config.cache.retention
    return {
        "enabled": retention.enabled,
        "interval_secs": retention.interval_secs,
        "keep_builds": retention.keep_builds,
        "grace_secs": retention.grace_secs,
        "caches": {
            name: {
                "paths": paths,
                "bytes": size,
                "quota_high_bytes": quota,
                "quota_low_bytes": (
                    retention.quota_low_bytes
                    if name == "main"
                    else retention.untrusted.quota_low_bytes
                ),
                "max_idle_days": (
                    retention.max_idle_days if name == "main" else retention.untrusted.max_idle_days
                ),
            }
            for name, (paths, size, quota) in sizes.items()
        },
        "last_run": None if last is None else json.loads(last.summary),
    }
