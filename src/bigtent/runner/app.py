"""Build the FastAPI app and run it under uvicorn; the lifespan runs the scheduler loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI

from bigtent import __version__
from bigtent.config import RunnerConfig
from bigtent.runner.api import api, cache_routes, install_error_handlers
from bigtent.runner.components import Components, build_components, close_components

log = logging.getLogger(__name__)


def create_app(comps: Components, on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """The ASGI app over already-built components. ``on_fatal`` is called if the scheduler
    loop dies (a bug): the runner must stop rather than accept work it will never dispatch."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(comps.scheduler.run(), name="scheduler")

        def _done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("scheduler loop died", exc_info=t.exception())
                if on_fatal is not None:
                    on_fatal()

        task.add_done_callback(_done)
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(
        title="bigtent runner",
        version=__version__,
        lifespan=lifespan,
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
    )
    app.state.components = comps
    install_error_handlers(app)
    app.include_router(api)
    app.include_router(cache_routes)
    return app


async def serve(config: RunnerConfig) -> None:
    """Run the runner until cancelled or signalled (uvicorn handles SIGINT/SIGTERM)."""
    comps = await build_components(config)
    server: uvicorn.Server | None = None

    def fatal() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(comps, on_fatal=fatal)
    tls = config.runner.tls
    uv_config = uvicorn.Config(
        app,
        host=config.runner.host,
        port=config.runner.port,
        log_config=None,
        access_log=False,
        ws="websockets",
        lifespan="on",
        timeout_graceful_shutdown=5,
        ssl_certfile=str(tls.cert_file) if tls else None,
        ssl_keyfile=str(tls.key_file) if tls else None,
        ssl_ca_certs=str(tls.client_ca) if tls and tls.client_ca else None,
        ssl_cert_reqs=ssl.CERT_OPTIONAL if tls and tls.client_ca else ssl.CERT_NONE,
    )
    server = uvicorn.Server(uv_config)
    log.info(
        "runner %s listening on %s (cache %s)", __version__, config.runner.listen, comps.cache.url
    )
    try:
        await server.serve()
    finally:
        await close_components(comps)
