"""The hot routes, answered without FastAPI's request path.

Per step of a build, ``bigtent build`` uploads its ``.drv`` (``PUT /api/v1/paths/<name>``)
and polls ``GET /api/v1/builds/{id}``, Nix's substituter on an agent asks ``GET
/cache/<hash>.narinfo`` and ``GET /cache/nar/<file>`` for each input, and the agent
``PUT``\\ s each output to ``/api/v1/agent/upload/{lease}/{name}``. Through FastAPI each of
these crossed about ten ASGI layers (error, telemetry and body-limit middlewares, exception
handling, an exit stack, the router and its included routers), route matching by a scan of
every route and dependency solving: several times the CPU of the endpoint itself
(``bench/requests_cpu.py``, docs/benchmarks.md).

``HotRoutes`` matches those requests by one regular expression each and calls the same
endpoint code the FastAPI routes call (``routes/cache.py``, ``routes/paths.py``,
``routes/builds.py``): the same responses, headers, HEAD and Range handling. ``RunnerApp``
(``app.py``) sends a matched request through the same ``CredentialGate`` the FastAPI stack
has; failures are rendered by the one ``handlers.failure_response``; anything else (a bug)
propagates to uvicorn, which answers 500 as Starlette's error middleware did. The FastAPI
routes stay registered: the OpenAPI schema is unchanged, and a request this module does not
take (another method, a GET with a body, a malformed id) goes through FastAPI as before.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from bigtent.runner.components import Components
from bigtent.runner.http.handlers import failure_response

Endpoint = Callable[[Components, Request, dict[str, str]], Awaitable[Response]]

HOT_SCOPE_KEY = "bigtent.hot"
"""Where ``RunnerApp`` leaves the matched route for ``answer`` (inside the gate)."""

_NO_BODY = (b"content-length", b"transfer-encoding")


@dataclass(frozen=True)
class HotRoute:
    methods: tuple[str, ...]
    """As its FastAPI route's (which takes HEAD only when it says so)."""
    pattern: re.Pattern[str]
    endpoint: Endpoint


@dataclass(frozen=True)
class Matched:
    endpoint: Endpoint
    params: dict[str, str]


_SEGMENTS = {"": "[^/]+", "digits": "[0-9]{1,18}"}
"""What a ``{name}`` of a template matches (as Starlette's routes: one path segment), and a
``{name:digits}``: an id FastAPI's int parameter takes alike (longer ones are left to it)."""


def _path(template: str) -> re.Pattern[str]:
    def param(m: re.Match[str]) -> str:
        return f"(?P<{m[1]}>{_SEGMENTS[m[2] or '']})"

    return re.compile("^" + re.sub(r"\{(\w+)(?::(\w+))?\}", param, template) + "$")


class HotRoutes:
    """The hot routes in FastAPI's order (the first match wins there too)."""

    def __init__(self, routes: list[HotRoute]) -> None:
        self.routes = routes
        self._by_method: dict[str, list[HotRoute]] = {}
        for route in routes:
            for method in route.methods:
                self._by_method.setdefault(method, []).append(route)

    def match(self, scope: Scope) -> Matched | None:
        """The route of an HTTP request this module answers, or None (FastAPI answers it)."""
        routes = self._by_method.get(scope["method"])
        if not routes or scope.get("root_path"):
            return None
        if scope["method"] in ("GET", "HEAD") and _has_body(scope):
            return None  # the app's body limit and whatever else FastAPI does with it
        path: str = scope["path"]
        for route in routes:
            found = route.pattern.match(path)
            if found is not None:
                return Matched(route.endpoint, found.groupdict())
        return None


def _has_body(scope: Scope) -> bool:
    return any(name in _NO_BODY and value != b"0" for name, value in scope["headers"])


async def answer(scope: Scope, receive: Receive, send: Send) -> None:
    """ASGI: answer the request ``RunnerApp`` matched (``scope[HOT_SCOPE_KEY]``)."""
    matched: Matched = scope[HOT_SCOPE_KEY]
    request = Request(scope, receive)
    comps: Components = scope["app"].state.components
    try:
        response = await matched.endpoint(comps, request, matched.params)
    except Exception as exc:
        failure = failure_response(request, exc)
        if failure is None:
            raise
        response = failure
    await response(scope, receive, send)


HotTable = dict[str, tuple[tuple[str, ...], Endpoint]]
"""``{path template: (methods, endpoint)}``, in matching order."""


def hot_routes(table: HotTable) -> HotRoutes:
    return HotRoutes(
        [HotRoute(methods, _path(template), ep) for template, (methods, ep) in table.items()]
    )
