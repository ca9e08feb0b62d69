"""``GET /metrics``: the runner's Prometheus exposition (docs/metrics.md).

Public, or behind a ``client``/``admin`` bearer token, as ``[runner] metrics_auth`` says (by
default public only when the runner listens on loopback). A refused credential counts against
the address like any other (the same throttle as the API) and is rendered and counted by the
API's one error handler.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from bigtent.config import MetricsAuth, Role
from bigtent.errors import AuthError
from bigtent.runner.components import Components
from bigtent.runner.venues.sessions import bearer_token

metrics_routes = APIRouter(include_in_schema=False)


@metrics_routes.get("/metrics")
async def metrics(request: Request) -> Response:
    # ``async def``: the collectors read the scheduler's state, which only the event loop
    # may touch (a plain ``def`` route would run in a worker thread).
    comps: Components = request.app.state.components
    if comps.config.runner.metrics_auth_mode is MetricsAuth.TOKEN:
        host = request.client.host if request.client else None
        comps.auth_throttle.check(host)
        try:
            comps.tokens.require(bearer_token(request.headers.get("authorization")), Role.CLIENT)
        except AuthError as exc:
            comps.auth_throttle.failed(host, exc)
            raise
    body, content_type = comps.metrics.render(request.headers.get("accept"))
    return Response(body, media_type=content_type)
