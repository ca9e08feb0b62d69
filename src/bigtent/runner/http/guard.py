"""What keeps an anonymous peer from taking the HTTP server offline: a deadline for a request's
headers, a cap on open connections, and a rate-limited log of accept errors.

uvicorn bounds only the idle time between requests (``timeout_keep_alive``, restarted by every
byte received) and answers 503 to *complete* requests above ``limit_concurrency``: a peer that
opens thousands of connections and trickles a header byte now and then passes both, until the
process runs out of file descriptors. So the runner serves HTTP with a small subclass of
uvicorn's protocol:

- **Header deadline.** From the moment a connection is accepted, and again from the first byte
  of each later request on a kept-alive connection, the request line and headers must be
  complete within ``header_timeout_secs``; trickling bytes do not extend it. Then the
  connection is closed. Headers over ``MAX_HEADER_BYTES`` are answered 431 and closed. Bodies
  are not timed here (uploads are long; routes bound their size).
- **Connection cap.** Above ``max_connections`` open connections (agents' WebSockets count
  but are never closed for it), a new connection closes the *oldest connection still waiting
  for its headers*; with none waiting, the new connection is closed. A flood of trickling
  connections therefore costs each real request at most the time to send its headers, never
  a refusal. The cap is kept below the process's file descriptor limit (``connection_cap``)
  so ``accept`` never fails with EMFILE because of HTTP connections.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
from typing import Any, ClassVar, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bigtent.ratelog import RateLimitedLog
from bigtent.runner.http.pathsend import offer_pathsend

log = logging.getLogger(__name__)
rate_limited = RateLimitedLog(log)

RESERVED_FDS = 256
"""File descriptors left to everything else: database connections, NAR and log files, Nix
processes' pipes, WebSockets (agents)."""

MAX_HEADER_BYTES = 64 * 1024
"""A request line and headers larger than this are refused (431) and the connection closed:
httptools itself sets no bound, and the header deadline bounds time, not size."""
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Connection: close\r\nContent-Length: 0\r\n\r\n"
)

_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def connection_cap(configured: int, fd_limit: int) -> int:
    """How many HTTP connections to allow: as configured, but below the file descriptor limit
    (``RLIMIT_NOFILE``, ``-1`` when unlimited) less ``RESERVED_FDS``, and at least 16."""
    if fd_limit < 0:
        return configured
    return max(16, min(configured, fd_limit - RESERVED_FDS))


def fd_limit() -> int:
    """The process's soft ``RLIMIT_NOFILE`` (``-1``: unlimited)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return -1 if soft == resource.RLIM_INFINITY else soft


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a header deadline and a connection cap (see the module).
    ``guarded_http`` makes a subclass with the settings; ``awaiting`` holds, oldest first, the
    connections of that subclass whose current request's headers are not yet complete."""

    header_timeout_secs: ClassVar[float] = 10.0
    max_connections: ClassVar[int] = 1024
    awaiting: ClassVar[dict[GuardedHttpProtocol, None]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()
        if len(self.connections) > self.max_connections:
            victim = next((c for c in self.awaiting if c is not self), self)
            rate_limited.log(
                "cap",
                logging.WARNING,
                "more than %d HTTP connections: closing the oldest still waiting for its "
                "request headers (runner.max_connections)",
                self.max_connections,
            )
            victim.close_now()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._await_headers()  # the first byte of the next request on a kept-alive one
        if self._header_timer is not None:
            self._header_bytes += len(data)
        super().data_received(data)
        # Still no complete headers (a chunk that completes them may carry body bytes too).
        if self._header_timer is not None and self._header_bytes > MAX_HEADER_BYTES:
            rate_limited.log(
                "header-size",
                logging.INFO,
                "closed an HTTP connection from %s: request headers over %d bytes",
                self.client[0] if self.client else "?",
                MAX_HEADER_BYTES,
            )
            if not self.transport.is_closing():
                self.transport.write(_TOO_LARGE)
            self.close_now()

    def on_headers_complete(self) -> None:
        self._headers_done()
        super().on_headers_complete()
        if self.cycle is not None:
            offer_pathsend(self.cycle, self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_done()
        super().connection_lost(exc)

    def close_now(self) -> None:
        self._headers_done()
        if not self.transport.is_closing():
            self.transport.close()

    def _await_headers(self) -> None:
        self._header_bytes = 0
        self.awaiting[self] = None
        self._header_timer = self.loop.call_later(self.header_timeout_secs, self._header_timeout)

    def _headers_done(self) -> None:
        self.awaiting.pop(self, None)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        rate_limited.log(
            "header-timeout",
            logging.INFO,
            "closed an HTTP connection from %s: no complete request headers within %.0f s",
            self.client[0] if self.client else "?",
            self.header_timeout_secs,
        )
        self.close_now()


def guarded_http(header_timeout_secs: float, max_connections: int) -> type[GuardedHttpProtocol]:
    """A ``GuardedHttpProtocol`` class with these settings, for ``uvicorn.Config(http=…)``."""
    attrs = {
        "header_timeout_secs": header_timeout_secs,
        "max_connections": max_connections,
        "awaiting": {},
    }
    return cast(
        type[GuardedHttpProtocol], type("RunnerHttpProtocol", (GuardedHttpProtocol,), attrs)
    )


def install_accept_error_log(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs every failed ``accept`` (EMFILE and the like) with a traceback, up to the
    listen backlog's number of times per wake-up: a flood of log lines exactly when the
    process is short of resources. Those are logged at most once per interval; everything
    else goes to the default handler."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
            rate_limited.log(
                "accept",
                logging.ERROR,
                "%s: %s (runner.max_connections and the file descriptor limit bound this)",
                context.get("message", "socket error"),
                exc.strerror or exc,
            )
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
