"""The runner's routes, one module per resource; ``api`` is ``/api/v1`` (docs/api.md);
``HOT`` the routes ``HotRoutes`` answers first (runner/http/hotpath.py)."""

from fastapi import APIRouter

from bigtent.runner.http.hotpath import HotRoutes, hot_routes
from bigtent.runner.http.routes import agents, builds, paths, status, steps, tokens
from bigtent.runner.http.routes.cache import HOT_CACHE, cache_routes

api = APIRouter(prefix="/api/v1")
for _resource in (status, paths, builds, steps, agents, tokens):
    api.include_router(_resource.router)

HOT: HotRoutes = hot_routes(paths.HOT_PATHS | builds.HOT_BUILDS | HOT_CACHE)

__all__ = ["HOT", "api", "cache_routes"]
