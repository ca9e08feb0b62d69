"""What the routes depend on: the components, the caller by role (a token or a CI job's ID
token), ids, timestamps and request body limits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from bigtent.config import Role
from bigtent.errors import AuthError, Forbidden
from bigtent.runner.auth.tokens import Principal
from bigtent.runner.components import Components
from bigtent.runner.venues.sessions import bearer_token, looks_like_jwt


async def _components(request: Request) -> Components:
    comps: Components = request.app.state.components
    return comps


Comps = Annotated[Components, Depends(_components)]


async def oidc_client(comps: Components, token: str) -> Principal:
    """The client a CI job's ID token stands for, when its ``[[auth.oidc]]`` rule says
    ``clients = true``: untrusted, named and scoped by the job's repository."""
    identity = await comps.sessions.verify_oidc(token)
    assert comps.sessions.oidc is not None  # verify_oidc refuses without issuers
    if not comps.sessions.oidc.admits_clients(identity):
        raise Forbidden("this issuer's ID tokens may not act as a client (clients = false)")
    return Principal(
        f"oidc:{identity.repository}", Role.CLIENT, trusted=False, repository=identity.repository
    )


async def caller(comps: Components, authorization: str | None, role: Role) -> Principal:
    """Who a request's credential stands for, if it has ``role`` (a CI job's ID token may
    stand for a client)."""
    token = bearer_token(authorization)
    if role is Role.CLIENT and token is not None and looks_like_jwt(token):
        return await oidc_client(comps, token)
    return comps.tokens.require(token, role)


def _require(role: Role) -> Any:
    # Dependencies are ``async def``: FastAPI runs plain ``def`` ones in a thread pool.
    async def check(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> Principal:
        return await caller(request.app.state.components, authorization, role)

    return Depends(check)


ClientAuth = Annotated[Principal, _require(Role.CLIENT)]
AgentAuth = Annotated[Principal, _require(Role.AGENT)]


async def agent_credential(comps: Components, request: Request) -> None:
    """An agent token, or the JWT of an OIDC-authenticated agent (the WebSocket's rule)."""
    token = bearer_token(request.headers.get("authorization"))
    host = request.client.host if request.client else None
    comps.sessions.throttle.check(host)
    try:
        if token is not None and looks_like_jwt(token):
            await comps.sessions.verify_oidc(token)
        else:
            comps.tokens.require(token, Role.AGENT)
    except AuthError as exc:
        comps.sessions.throttle.failed(host, exc)
        raise


async def _agent_credential(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> None:
    await agent_credential(request.app.state.components, request)


AgentCredential = Annotated[None, Depends(_agent_credential)]
AdminAuth = Annotated[Principal, _require(Role.ADMIN)]


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


async def request_body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        yield chunk


# Request bodies are bounded per route before they are read: a Content-Length above the
# route's limit is answered 413 at once, and a body without one is counted as it streams and
# refused (413) at the limit. Every route not named below has the app's default
# (``JSON_BODY_BYTES``, set in ``app.create_app``).
JSON_BODY_BYTES = 1024 * 1024
"""A JSON request or a form: tokens, bumps, presign and complete declarations, dashboard forms."""
LIST_BODY_BYTES = 32 * 1024 * 1024
"""``POST /builds`` and ``/paths/missing``: ~300,000 store paths, more than any closure."""
BATCH_BODY_BYTES = 16 * 1024 * 1024
"""``POST /paths/batch``: many small NARs held in memory while they are verified (a client
sends at most 8 MiB; a larger path has its own streamed upload)."""
STREAMED_BODY = 2**62
"""NAR uploads stream to storage and are bounded while they do (declared size,
``cache.max_nar_bytes``): no limit here."""
