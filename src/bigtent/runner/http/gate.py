"""The credential gate: ``/api/v1`` requests without a valid credential are refused before their
body is read."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from bigtent.errors import AuthError, TooManyAuthFailures
from bigtent.runner.auth.ratelimit import FailureThrottle
from bigtent.runner.auth.tokens import Principal, TokenRegistry
from bigtent.runner.http.handlers import error_response
from bigtent.runner.metrics import Metrics
from bigtent.runner.venues.sessions import bearer_token, looks_like_jwt

log = logging.getLogger(__name__)

_PUBLIC_API_PATHS = frozenset({"/api/v1/openapi.json", "/api/v1/docs"})


def _jwt_for_upload(path: str, scope: Scope) -> bool:
    """An OIDC agent uploads its outputs with its JWT: that route verifies it itself."""
    if not path.startswith(_UPLOAD_PREFIX):
        return False
    token = bearer_token(Headers(scope=scope).get("authorization"))
    return token is not None and looks_like_jwt(token)


_UPLOAD_PREFIX = "/api/v1/agent/upload/"
HOOKS_PREFIX = "/api/v1/hooks/"
"""Forge webhooks carry no bearer token: their route checks the body's HMAC signature."""


class CredentialGate:
    """ASGI middleware: an ``/api/v1`` HTTP request without a valid credential is answered 401
    before its body is read, so an anonymous peer cannot make the runner buffer a large JSON
    body; an address with too many recent credential failures is answered 429 without a look
    at its credential. Routes still check the role; WebSockets check theirs (and the same
    limit) before the upgrade."""

    def __init__(
        self,
        app: ASGIApp,
        tokens: TokenRegistry,
        throttle: FailureThrottle,
        metrics: Metrics,
        jwt_client: Callable[[str], Awaitable[Principal]] | None = None,
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.throttle = throttle
        self.metrics = metrics
        self.jwt_client = jwt_client
        """Verifies a CI job's ID token acting as a client (``oidc_client``); None: no
        ``[[auth.oidc]]`` rule admits clients, and a JWT is refused like any unknown token."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] == "http"
            and path.startswith("/api/v1/")
            and path not in _PUBLIC_API_PATHS
            and not path.startswith(HOOKS_PREFIX)
            and not _jwt_for_upload(path, scope)
        ):
            client = scope.get("client")
            host: str | None = client[0] if client else None
            token = bearer_token(Headers(scope=scope).get("authorization"))
            try:
                self.throttle.check(host)
                try:
                    if self.jwt_client is not None and token and looks_like_jwt(token):
                        await self.jwt_client(token)
                    else:
                        self.tokens.authenticate(token)
                except AuthError as exc:
                    self.throttle.failed(host, exc)
                    raise
            except AuthError as exc:
                self.metrics.auth_failed(exc, token)
                # A limited address's requests are not logged one by one: the throttle
                # logged when the limit was reached.
                level = logging.DEBUG if isinstance(exc, TooManyAuthFailures) else logging.WARNING
                log.log(level, "%s %s from %s refused: %s", scope["method"], path, host or "?", exc)
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)
