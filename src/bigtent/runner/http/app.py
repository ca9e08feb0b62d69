"""Build the FastAPI app and run it under uvicorn; the lifespan runs the scheduler loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from bigtent import __version__
from bigtent.config import RunnerConfig
from bigtent.errors import ConfigError
from bigtent.protocol import MAX_MESSAGE_BYTES
from bigtent.runner.autoscale.routes import launch_routes
from bigtent.runner.cache.s3 import S3Storage
from bigtent.runner.ci.pages import ci_pages
from bigtent.runner.ci.routes import ci_routes
from bigtent.runner.components import Components, build_components, close_components
from bigtent.runner.dashboard.routes import install_dashboard
from bigtent.runner.forge.service import ForgeReporter
from bigtent.runner.http.deps import JSON_BODY_BYTES, oidc_client
from bigtent.runner.http.gate import CredentialGate
from bigtent.runner.http.guard import (
    connection_cap,
    fd_limit,
    guarded_http,
    install_accept_error_log,
)
from bigtent.runner.http.handlers import install_error_handlers
from bigtent.runner.http.health import health_routes
from bigtent.runner.http.hotpath import HOT_SCOPE_KEY
from bigtent.runner.http.hotpath import answer as answer_hot
from bigtent.runner.http.metrics import metrics_routes
from bigtent.runner.http.routes import HOT, api, cache_routes
from bigtent.runner.http.tls import CertWebSocketProtocol
from bigtent.runner.logs.retention import run_log_retention
from bigtent.runner.retention.routes import retention_routes
from bigtent.runner.venues.agents import run_pruner

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 2048
WS_MAX_FRAME_BYTES = 4 * MAX_MESSAGE_BYTES
"""Largest WebSocket message uvicorn accepts; larger ones close the socket (code 1009)."""


class RunnerApp(FastAPI):
    """The runner's FastAPI app, with the hot routes (``routes.HOT``) answered before
    FastAPI's request path, through the same credential gate (runner/http/hotpath.py)."""

    hot_gate: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.hot_gate is not None:
            matched = HOT.match(scope)
            if matched is not None:
                scope["app"] = self
                scope[HOT_SCOPE_KEY] = matched
                await self.hot_gate(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(comps: Components, on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """The ASGI app over already-built components. ``on_fatal`` is called if the scheduler
    loop or the agent pruner dies (a bug; both survive ordinary errors): the runner must stop
    rather than accept work it will never dispatch."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(comps.scheduler.run(), name="scheduler"),
            asyncio.create_task(
                run_pruner(
                    comps.engine,
                    comps.config.scheduler.ephemeral_session_ttl_secs,
                    comps.scheduler.clock,
                ),
                name="agent-pruner",
            ),
            asyncio.create_task(comps.ssh.run(), name="ssh-builders"),
            asyncio.create_task(
                run_log_retention(
                    comps.logs,
                    comps.config.scheduler.log_retention_days,
                    comps.config.scheduler.log_retention_check_secs,
                    comps.scheduler.clock,
                    comps.scheduler.step_active,
                    comps.metrics.logs_expired.inc,
                ),
                name="log-retention",
            ),
        ]
        if comps.autoscaler is not None and comps.autoscaler.enabled:
            tasks.append(asyncio.create_task(comps.autoscaler.run(), name="autoscaler"))
        if isinstance(comps.cache.storage, S3Storage):
            tasks.append(asyncio.create_task(comps.cache.storage.run_sweeper(), name="s3-sweeper"))
        if comps.feed is not None:
            tasks.append(asyncio.create_task(comps.feed.follow(comps.on_change), name="feed"))
        if comps.ci is not None:
            tasks.append(asyncio.create_task(comps.ci.run(), name="ci"))
        retention = comps.config.cache.retention
        if comps.usage is not None:
            tasks.append(
                asyncio.create_task(comps.usage.run(retention.usage_flush_secs), name="usage")
            )
        if comps.collector is not None:
            tasks.append(asyncio.create_task(comps.collector.run(), name="cache-gc"))

        def _done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("%s task died", t.get_name(), exc_info=t.exception())
                if on_fatal is not None:
                    on_fatal()

        for task in tasks:
            task.add_done_callback(_done)
        reporter = comps.reporter if isinstance(comps.reporter, ForgeReporter) else None
        if reporter is not None:
            await reporter.start()
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if reporter is not None:
                await reporter.stop()

    app = RunnerApp(
        title="bigtent runner",
        version=__version__,
        lifespan=lifespan,
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
        max_body_size=JSON_BODY_BYTES,
    )
    app.state.components = comps
    install_error_handlers(app)
    clients_by_oidc = any(rule.clients for rule in comps.config.auth.oidc)
    gate: dict[str, Any] = {
        "tokens": comps.tokens,
        "throttle": comps.auth_throttle,
        "metrics": comps.metrics,
        "jwt_client": (lambda token: oidc_client(comps, token)) if clients_by_oidc else None,
    }
    app.add_middleware(CredentialGate, **gate)
    app.hot_gate = CredentialGate(answer_hot, **gate)
    app.include_router(api)
    app.include_router(launch_routes)
    app.include_router(ci_routes)
    app.include_router(retention_routes)
    app.include_router(cache_routes)
    app.include_router(metrics_routes)
    app.include_router(health_routes)
    install_dashboard(app, comps)
    app.include_router(ci_pages)
    return app


def uvicorn_config(app: FastAPI, config: RunnerConfig) -> uvicorn.Config:
    """How the runner is served: its lifespan on, WebSocket frames bounded (a few times the
    protocol's message limit, so a slightly oversized message still gets an ``error`` reply
    from the session rather than a bare close), no per-message compression on the agents'
    WebSocket (its messages are small: compressing each one was four fifths of the runner's
    CPU for sending it, for a few hundred bytes saved), request headers,
    idle keep-alive and open connections bounded (``guard``), TLS when configured."""
    tls = config.runner.tls
    return uvicorn.Config(
        app,
        host=config.runner.host,
        port=config.runner.port,
        log_config=None,
        access_log=False,
        http=guarded_http(
            config.runner.header_timeout_secs,
            connection_cap(config.runner.max_connections, fd_limit()),
        ),
        timeout_keep_alive=config.runner.keep_alive_secs,
        ws=CertWebSocketProtocol,
        ws_max_size=WS_MAX_FRAME_BYTES,
        ws_per_message_deflate=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        ssl_certfile=str(tls.cert_file) if tls else None,
        ssl_keyfile=str(tls.key_file) if tls else None,
        ssl_ca_certs=str(tls.client_ca) if tls and tls.client_ca else None,
        # CERT_OPTIONAL, not REQUIRED: Nix reading /cache and clients with tokens present no
        # certificate (Nix cannot), while agents must (sessions.py refuses one without it).
        # A presented certificate is still verified against client_ca in the handshake.
        ssl_cert_reqs=ssl.CERT_OPTIONAL if tls and tls.client_ca else ssl.CERT_NONE,
    )


def bind(config: RunnerConfig) -> tuple[socket.socket, RunnerConfig]:
    """Bind the listening socket before anything else, so that with port 0 the URLs the
    runner hands out (cache URL, upload URLs) name the port actually bound."""
    host, port = config.runner.host, config.runner.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio disables Nagle (TCP_NODELAY) only on sockets whose
    # proto says TCP, and accepted sockets inherit proto 0 otherwise. Without it every
    # response on a kept-alive connection waits ~40 ms for a delayed ACK (Nix's narinfo
    # queries reuse connections: 40 ms per path).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)  # holds the port: another runner cannot bind it too
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"config key runner.listen: cannot listen on {config.runner.listen}: {exc.strerror}"
        ) from exc
    sock.set_inheritable(True)
    bound = sock.getsockname()[1]
    if bound != port:
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        runner = config.runner.model_copy(update={"listen": f"{shown}:{bound}"})
        config = config.model_copy(update={"runner": runner})
    return sock, config


async def serve(config: RunnerConfig) -> None:
    """Run the runner until cancelled or signalled (uvicorn handles SIGINT/SIGTERM)."""
    sock, config = bind(config)
    try:
        comps = await build_components(config)
    except BaseException:
        sock.close()
        raise
    server: uvicorn.Server | None = None

    def fatal() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(comps, on_fatal=fatal)
    install_accept_error_log(asyncio.get_running_loop())
    server = uvicorn.Server(uvicorn_config(app, config))
    log.info(
        "runner %s listening on %s (cache %s)", __version__, config.runner.listen, comps.cache.url
    )
    try:
        await server.serve(sockets=[sock])
    finally:
        sock.close()
        await close_components(comps)
