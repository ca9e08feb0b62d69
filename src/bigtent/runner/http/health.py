"""``GET /healthz``: whether this runner is sound, for a supervisor (docs/api.md).

Public and cheap: it reads the scheduler's memory only, never the database. 200
``{"status": "ok"}`` while the scheduler works; 503 ``{"status": "unhealthy", "reason": …}``
while reloading the scheduler's state from the database keeps failing (the scheduler then
dispatches nothing), so a supervisor restarts the runner. The reason names what failed, never
the database's own error text (which may name hosts); ``/api/v1/status`` (a client token) and
the dashboard show that.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from bigtent.runner.components import Components

health_routes = APIRouter(include_in_schema=False)

UNHEALTHY_REASON = "the scheduler cannot reload its state from the database"


@health_routes.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    comps: Components = request.app.state.components
    failure = comps.scheduler.recovery
    if failure is None:
        return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})
    return JSONResponse(
        {"status": "unhealthy", "reason": UNHEALTHY_REASON, "failures": failure.failures},
        status_code=503,
        headers={"Cache-Control": "no-store", "Retry-After": "5"},
    )
