"""The runner's routes, one module per resource; ``api`` is ``/api/v1`` (docs/api.md)."""

from fastapi import APIRouter

from bigtent.runner.http.routes import agents, builds, paths, status, steps, tokens
from bigtent.runner.http.routes.cache import cache_routes

api = APIRouter(prefix="/api/v1")
for _resource in (status, paths, builds, steps, agents, tokens):
    api.include_router(_resource.router)

__all__ = ["api", "cache_routes"]
