"""Agent sessions over WebSocket (architecture §2): auth before accept, then protocol messages.

The credential is an agent token or, when ``[[auth.oidc]]`` issuers are configured, a CI
job's OIDC ID token (a JWT, architecture §6): an OIDC agent is always ephemeral and its identity is
stored on its agent row. JWTs are accepted here only, never on the HTTP API.

This is the only module that sees raw frames. Each session has a bounded outgoing queue and a
writer task, so the scheduler never waits on a slow socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from bigtent import protocol as p
from bigtent.config import Role, RunnerConfig
from bigtent.errors import AuthError, Forbidden, ProtocolError, TooManyAuthFailures
from bigtent.runner.auth.oidc import InvalidToken, OidcVerifier
from bigtent.runner.auth.policy import AgentIdentity
from bigtent.runner.auth.ratelimit import FailureThrottle
from bigtent.runner.auth.tokens import Principal, TokenRegistry
from bigtent.runner.db import queries
from bigtent.runner.http.tls import PeerCert, name_is_pinned, peer_cert
from bigtent.runner.metrics import Metrics
from bigtent.runner.scheduler.model import SessionClosed, Venue
from bigtent.runner.scheduler.service import Scheduler
from bigtent.runner.trust import VenueScope, oidc_venue_scope, token_venue_scope

log = logging.getLogger(__name__)

REGISTER_TIMEOUT_SECS = 30.0
OUTGOING_QUEUE_MAX = 10_000
MAX_NAME_BYTES = 128
NORMAL_CLOSURE = 1000
CERT_REQUIRED = "a client certificate is required"
POLICY_VIOLATION = 1008
"""WebSocket close code after a protocol error (RFC 6455 §7.4.1)."""


_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
"""A compact JWS: header, payload and signature, base64url and dot-separated (RFC 7515 §7.1;
the signature may be empty, as in ``alg: none``, so such a token is refused by the verifier
with its reason). Tokens never contain a dot."""


class LaunchRegistry(Protocol):
    """Told when an agent registers with a launch id (the autoscaler, docs/autoscaling.md)."""

    async def registered(
        self, launch_id: str, machine_id: str, name: str, identity: AgentIdentity | None
    ) -> None: ...

    async def claim_scope(
        self, launch_id: str, machine_id: str, identity: AgentIdentity | None
    ) -> frozenset[str] | None: ...


def looks_like_jwt(credential: str) -> bool:
    return _JWT.fullmatch(credential) is not None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


@dataclass(eq=False)
class AgentSession:
    websocket: WebSocket
    outgoing: asyncio.Queue[str | None] = field(
        default_factory=lambda: asyncio.Queue(OUTGOING_QUEUE_MAX)
    )
    closed: bool = False
    close_code: int = NORMAL_CLOSURE
    venue: Venue | None = None
    record: dict[str, Any] = field(default_factory=dict)
    """The agent row's registration values, to record it again if it was pruned."""
    identity: AgentIdentity | None = None
    """The CI job an OIDC agent authenticated as; None for a token agent."""
    principal: Principal | None = None
    """The token a token agent authenticated with; None for an OIDC agent."""
    cert: PeerCert | None = None
    """The client certificate the TLS handshake verified (mTLS), if any."""
    last_heartbeat: p.Heartbeat | None = None
    """The agent's latest load report (the dashboard shows it)."""
    broke_protocol: bool = False
    """The session ended with a protocol error: its leases are not kept for a return."""

    def send(self, message: BaseModel) -> None:
        """Queue a message; raise SessionClosed when the session is over or hopelessly slow."""
        if self.closed:
            raise SessionClosed()
        try:
            self.outgoing.put_nowait(p.encode(message))
        except asyncio.QueueFull:
            self.close()
            raise SessionClosed() from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(asyncio.QueueFull):
                self.outgoing.put_nowait(None)


class Sessions:
    """All live agent sessions, by machine id; a newer session replaces an older one."""

    def __init__(
        self,
        config: RunnerConfig,
        engine: AsyncEngine,
        scheduler: Scheduler,
        tokens: TokenRegistry,
        cache_url: str,
        cache_public_key: str,
        throttle: FailureThrottle,
        oidc: OidcVerifier | None = None,
        metrics: Metrics | None = None,
        launches: LaunchRegistry | None = None,
        *,
        untrusted_cache: p.Substituter | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.scheduler = scheduler
        self.tokens = tokens
        self.cache_url = cache_url
        self.cache_public_key = cache_public_key
        self.throttle = throttle
        self.oidc = oidc
        self.launches = launches
        self.untrusted_cache = untrusted_cache
        """Substituted from by untrusted venues only (announced first in ``upstreams``)."""
        self.live: dict[str, AgentSession] = {}
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.watch_sessions(lambda: self.live.values())

    async def handle(self, websocket: WebSocket) -> None:
        """The WebSocket endpoint: check the credential (a token, or a JWT for the OIDC
        verifier) before accepting the upgrade; an address with too many recent credential
        failures is refused (429) unchecked."""
        token = bearer_token(websocket.headers.get("authorization"))
        host = websocket.client.host if websocket.client else None
        identity: AgentIdentity | None = None
        principal: Principal | None = None
        cert = peer_cert(websocket.scope)
        try:
            self.throttle.check(host)
            try:
                if token is not None and looks_like_jwt(token):
                    identity = await self.verify_oidc(token)
                else:
                    principal = self.tokens.require(token, Role.AGENT)
                    if cert is None and self._client_ca:
                        raise Forbidden(CERT_REQUIRED)
            except AuthError as exc:
                self.throttle.failed(host, exc)
                raise
        except AuthError as exc:
            self.metrics.auth_failed(exc, token)
            headers = None
            if isinstance(exc, TooManyAuthFailures):
                log.debug("agent connection from %s refused: %s", host or "?", exc)
                reason = "too many failed authentication attempts"
                headers = {"Retry-After": str(exc.retry_after_secs)}
            elif token is not None and looks_like_jwt(token):
                # The verifier logged the detail; the agent gets the short public reason.
                log.warning("agent connection from %s refused: OIDC: %s", host or "?", exc)
                reason = exc.message
            else:
                log.warning("agent connection from %s refused: %s", host or "?", exc)
                reason = "forbidden" if exc.http_status == 403 else "unauthorized"
                if exc.message == CERT_REQUIRED:
                    reason = CERT_REQUIRED
            await websocket.send_denial_response(
                JSONResponse(
                    {"error": reason, "detail": None},
                    status_code=exc.http_status,
                    headers=headers,
                )
            )
            return
        await websocket.accept()
        session = AgentSession(websocket, identity=identity, principal=principal, cert=cert)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._writer(session))
                try:
                    await self._serve(session)
                except ProtocolError as exc:
                    # The error goes through the send queue, so it is the last message the
                    # agent sees before the close (architecture §2: `error`, then close).
                    log.warning("agent protocol error: %s", exc)
                    session.close_code = POLICY_VIOLATION
                    session.broke_protocol = True
                    with contextlib.suppress(SessionClosed):
                        session.send(p.Error(message=str(exc)[: p.MAX_ERROR_CHARS]))
                finally:
                    session.close()
        except* WebSocketDisconnect:
            pass
        finally:
            await self._ended(session)

    @property
    def _client_ca(self) -> bool:
        tls = self.config.runner.tls
        return tls is not None and tls.client_ca is not None

    @property
    def _pin_client_name(self) -> bool:
        tls = self.config.runner.tls
        return tls is not None and tls.pin_client_name

    async def verify_oidc(self, token: str) -> AgentIdentity:
        """Verify a CI job's JWT (401 when no issuer is configured)."""
        if self.oidc is None:
            raise InvalidToken("OIDC tokens are not accepted by this runner")
        return await self.oidc.verify(token)

    async def _writer(self, session: AgentSession) -> None:
        while (text := await session.outgoing.get()) is not None:
            try:
                await session.websocket.send_text(text)
            except (WebSocketDisconnect, RuntimeError, OSError):
                session.closed = True
                return
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await session.websocket.close(code=session.close_code)

    async def _receive(self, session: AgentSession) -> p.AgentMessage | None:
        message = await session.websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        text = message.get("text")
        # The size limit is in bytes (MAX_MESSAGE_BYTES), not characters.
        data: bytes | None = text.encode() if text is not None else message.get("bytes")
        if data is None:
            raise ProtocolError("empty frame")
        return p.parse_agent_message(data)

    async def _serve(self, session: AgentSession) -> None:
        try:
            first = await asyncio.wait_for(self._receive(session), REGISTER_TIMEOUT_SECS)
        except TimeoutError as exc:
            raise ProtocolError("no register message within 30 s") from exc
        if first is None:
            return
        if not isinstance(first, p.Register):
            raise ProtocolError(f"expected register, got {first.type}")
        if first.proto != p.PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol {first.proto!r} is not supported (runner speaks {p.PROTOCOL_VERSION})"
            )
        if len(first.name.encode()) > MAX_NAME_BYTES:
            raise ProtocolError(f"agent name longer than {MAX_NAME_BYTES} bytes")
        venue = await self._register(session, first)
        if venue is None:
            return
        while (msg := await self._receive(session)) is not None and not session.closed:
            await self._dispatch(session, venue, msg)

    async def _register(self, session: AgentSession, reg: p.Register) -> Venue | None:
        now = self.scheduler.clock()
        identity = session.identity
        ephemeral = reg.ephemeral
        # architecture §6 mTLS: the verified certificate must name this agent (token agents; an
        # OIDC agent is named by its verified job token instead).
        pinned = identity is not None or not self._pin_client_name
        if not pinned and not name_is_pinned(session.cert, reg.name, reg.ephemeral):
            log.warning("agent %r refused: its client certificate does not name it", reg.name)
            raise ProtocolError(f"the client certificate does not name agent {reg.name!r}")
        await self._check_machine_id(session, reg)
        if identity is not None:
            if not reg.ephemeral:
                log.info(
                    "agent %s (OIDC, %s) registered as persistent; recorded as ephemeral",
                    reg.name,
                    identity.repository,
                )
            ephemeral = True  # architecture §6: whatever it claims
        scope = self.venue_scope(identity, reg)
        if identity is not None and reg.launch_id is not None and self.launches is not None:
            # A pool's launched agent serves the pool's allowed build repositories (issue 5:
            # a central workflow repository launches agents for other repositories).
            pool_repositories = await self.launches.claim_scope(
                reg.launch_id, reg.machine_id, identity
            )
            if pool_repositories is not None:
                scope = replace(scope, repositories=pool_repositories)
        old = self.live.get(reg.machine_id)
        if old is not None:
            log.info("agent %s reconnected; closing its older session", reg.name)
            old.close()
            if old.venue is not None:
                self.scheduler.detach(old.venue)
        venue = Venue(
            machine_id=reg.machine_id,
            name=reg.name,
            systems=frozenset(reg.systems),
            supported_features=frozenset(reg.supported_features),
            mandatory_features=frozenset(reg.mandatory_features),
            max_jobs=reg.max_jobs,
            speed_factor=reg.speed_factor,
            send=session.send,
            launch_id=reg.launch_id,
            trusted=scope.trusted,
            repositories=scope.repositories,
            free_store_bytes=reg.free_store_bytes,
        )
        session.venue = venue
        self.live[reg.machine_id] = session
        session.record = dict(
            name=reg.name,
            hostname=reg.hostname,
            systems=_json(reg.systems),
            supported_features=_json(reg.supported_features),
            mandatory_features=_json(reg.mandatory_features),
            max_jobs=reg.max_jobs,
            speed_factor=reg.speed_factor,
            ephemeral=ephemeral,
            auth_kind="token" if identity is None else "oidc",
            credential=session.principal.name if session.principal else None,
            launch_id=reg.launch_id,
            version=reg.version,
            trusted=scope.trusted,
            **_identity_columns(identity),
        )
        async with self.engine.begin() as conn:
            row = await queries.upsert_agent(
                conn, reg.machine_id, **session.record, connected=True, last_seen=now
            )
        restore_backoff(venue, row)
        if session.closed or self.live.get(reg.machine_id) is not session:
            # A newer session of the same machine registered while we awaited the database:
            # it owns the venue now, and this one must not attach over it.
            return None
        # attach() and the Registered message happen with no await in between, so the
        # agent always sees Registered before its first Assign.
        kept = self.scheduler.attach(venue, reg.running)
        upstreams = [
            p.Substituter(url=u.url, public_key=u.public_key) for u in self.config.cache.upstreams
        ]
        if not scope.trusted and self.untrusted_cache is not None:
            upstreams.insert(0, self.untrusted_cache)
        session.send(
            p.Registered(
                session_id=f"{reg.machine_id}:{int(now * 1000)}",
                heartbeat_secs=self.config.scheduler.heartbeat_secs,
                lease_secs=self.config.scheduler.lease_secs,
                cache_url=self.cache_url,
                cache_public_key=self.cache_public_key,
                upstreams=upstreams,
                keep_running=kept,
                untrusted=not scope.trusted,
                **upload_settings(self.config),
            )
        )
        log.info(
            "agent %s (%s) registered: %s, %d jobs%s",
            reg.name,
            reg.machine_id,
            ",".join(reg.systems),
            reg.max_jobs,
            "" if scope.trusted else ", untrusted",
        )
        if reg.launch_id is not None and self.launches is not None:
            await self.launches.registered(reg.launch_id, reg.machine_id, reg.name, identity)
        return venue

    def venue_scope(self, identity: AgentIdentity | None, reg: p.Register) -> VenueScope:
        """architecture §6: a token agent is trusted unless it asks not to be, and serves any
        repository; an OIDC agent's trust and repositories are its issuer rule's. An OIDC
        agent asking to be untrusted when its rule does not allow untrusted builds is refused
        (it could take nothing)."""
        if identity is None:
            return token_venue_scope(untrusted=reg.untrusted)
        rule = next(r for r in self.config.auth.oidc if r.issuer == identity.issuer)
        scope = oidc_venue_scope(rule)
        if reg.untrusted and scope.trusted:
            raise ProtocolError(
                "this agent asks to be untrusted, but its OIDC issuer rule does not allow "
                "untrusted builds (allow_untrusted)"
            )
        return scope

    async def _check_machine_id(self, session: AgentSession, reg: p.Register) -> None:
        """A machine id belongs to the credential that registered it: another credential
        may not take it over (it would close that agent's session, keep the leases it
        lists as running, and so upload for steps leased to someone else).

        OIDC agents: the same CI identity only. Token agents: the same token while that token
        is valid; once it is revoked or removed, a new token may take the machine id over
        (token rotation). An agent row without a recorded token is claimed by the first."""
        in_use = ProtocolError("machine id is in use by another agent")
        old = self.live.get(reg.machine_id)
        if old is not None and not _same_credential(old, session):
            raise in_use
        async with self.engine.connect() as conn:
            row = await queries.fetch_agent(conn, reg.machine_id)
        if row is None:
            return
        identity = session.identity
        if identity is not None or row.auth_kind == "oidc":
            if _identity_columns(identity) != {
                name: getattr(row, name) for name in _IDENTITY_COLUMNS
            }:
                raise in_use
            return
        assert session.principal is not None
        bound = row.credential
        if bound is not None and bound != session.principal.name:
            if self.tokens.is_valid(bound):
                log.warning(
                    "agent %r refused: machine id %s is bound to token %r, not %r",
                    reg.name,
                    reg.machine_id,
                    bound,
                    session.principal.name,
                )
                raise in_use
            log.info(
                "machine id %s moves from token %r (no longer valid) to %r",
                reg.machine_id,
                bound,
                session.principal.name,
            )

    async def _dispatch(self, session: AgentSession, venue: Venue, msg: p.AgentMessage) -> None:
        match msg:
            case p.Heartbeat():
                session.last_heartbeat = msg
                self.scheduler.heartbeat(venue, msg.running)
                self.scheduler.disk_report(venue, msg.free_store_bytes)
                if msg.draining and not venue.draining:
                    log.info("agent %s is draining: no more assignments", venue.name)
                    venue.draining = True
                    self.scheduler.capacity_changed()
                await self._seen(session, venue)
            case p.Accepted():
                await self.scheduler.accepted(venue, msg)
            case p.Refused():
                await self.scheduler.refused(venue, msg)
            case p.Log():
                self.scheduler.log_lines(venue, msg)
            case p.Result():
                recorded = await self.scheduler.result(venue, msg)
                with contextlib.suppress(SessionClosed):  # replaced meanwhile: it re-sends
                    session.send(
                        p.ResultAck(step_id=msg.step_id, lease_id=msg.lease_id, recorded=recorded)
                    )
            case p.Register():
                raise ProtocolError("register sent twice in one session")

    async def _seen(self, session: AgentSession, venue: Venue) -> None:
        """Note a heartbeat. An agent whose row was pruned while it was still connected (its
        heartbeats stalled past the TTL) is simply recorded again."""
        now = self.scheduler.clock()
        async with self.engine.begin() as conn:
            if await queries.update_agent(conn, venue.machine_id, last_seen=now, connected=True):
                return
            await queries.upsert_agent(
                conn,
                venue.machine_id,
                **session.record,
                connected=True,
                last_seen=now,
                consecutive_failures=venue.consecutive_failures,
                backoff_until=venue.backoff_until or None,
            )
        log.info("agent %s was pruned while connected; recorded again", venue.name)

    async def _ended(self, session: AgentSession) -> None:
        venue = session.venue
        if venue is None:
            return
        self.scheduler.detach(venue)
        await self.scheduler.release_unaccepted(venue)
        if session.broke_protocol:
            lost = self.scheduler.forfeit(venue)
            if lost:
                log.warning(
                    "agent %s broke the protocol: its %d lease(s) expire now", venue.name, lost
                )
        if self.live.get(venue.machine_id) is session:
            del self.live[venue.machine_id]
            try:
                async with self.engine.begin() as conn:
                    await queries.update_agent(
                        conn, venue.machine_id, connected=False, last_seen=self.scheduler.clock()
                    )
            except SQLAlchemyError:
                # The session is over either way; the row is fixed at the next start.
                log.warning("could not mark agent %s disconnected", venue.name, exc_info=True)
        log.info("agent %s disconnected", venue.name)


def _same_credential(a: AgentSession, b: AgentSession) -> bool:
    if a.identity is not None or b.identity is not None:
        return a.identity == b.identity
    return a.principal is not None and b.principal is not None and a.principal == b.principal


def restore_backoff(venue: Venue, row: Any) -> None:
    """Give a newly registered venue the backoff its agent row holds. architecture §4: the backoff
    belongs to the machine, not the session: a flapping agent must not shed it by
    reconnecting."""
    venue.consecutive_failures = int(row.consecutive_failures)
    venue.backoff_until = float(row.backoff_until or 0.0)
    venue.last_error = row.health_last_error or ""


_IDENTITY_COLUMNS = (
    "oidc_issuer",
    "oidc_repository",
    "oidc_subject",
    "oidc_workflow_ref",
    "oidc_ref",
)


def _identity_columns(identity: AgentIdentity | None) -> dict[str, str | None]:
    """The agent row's OIDC columns (all None for a token agent)."""
    if identity is None:
        return dict.fromkeys(_IDENTITY_COLUMNS)
    return {
        "oidc_issuer": identity.issuer,
        "oidc_repository": identity.repository,
        "oidc_subject": identity.subject,
        "oidc_workflow_ref": identity.workflow_ref,
        "oidc_ref": identity.ref,
    }


def _json(items: list[str]) -> str:
    return json.dumps(sorted(items))


def upload_settings(config: RunnerConfig) -> dict[str, Any]:
    """What ``registered`` tells agents about uploads: presigned (S3) or not, and the
    compression their files must have (docs/api.md)."""
    cache = config.cache
    return {
        "presigned_uploads": cache.s3 is not None
        and cache.storage == "s3"
        and cache.s3.presigned_uploads,
        "compression": str(cache.compression),
        "compression_level": cache.compression_level,
    }
