"""The agent's WebSocket to the runner: where it is (``agent_ws_url``), the ``Connection``
the session speaks through, and the production ``websocket_connector`` (the ``websockets``
client, with the upgrade's refusals turned into ``AuthError`` / ``RunnerUnreachable``)."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException

from bigtent.errors import AuthError, ConfigError, Forbidden, RunnerUnreachable, parse_error_body
from bigtent.protocol import MAX_MESSAGE_BYTES

WS_PATH = "/api/v1/agent/ws"
CONNECT_TIMEOUT_SECS = 10.0
"""TCP, TLS and the WebSocket upgrade together."""


class Disconnected(Exception):
    """The session's WebSocket closed or broke."""


class Connection(Protocol):
    """One WebSocket session as the agent uses it; ``send``/``recv`` raise ``Disconnected``."""

    async def send(self, message: str) -> None: ...

    async def recv(self) -> str | bytes: ...


Connector = Callable[[str, Mapping[str, str]], contextlib.AbstractAsyncContextManager[Connection]]
"""Opens a session: ``(ws_url, headers)``. Raises ``AuthError`` when the runner refuses the
credentials at the upgrade (401/403), ``RunnerUnreachable`` for anything it may retry."""


def agent_ws_url(runner_url: str) -> str:
    """``http(s)://host:port[/prefix]`` -> ``ws(s)://host:port[/prefix]/api/v1/agent/ws``."""
    parts = urlsplit(runner_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ConfigError(
            f"config key agent.runner_url must be an http:// or https:// URL (got {runner_url!r})"
        )
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + WS_PATH, "", ""))


class _WebSocketConnection:
    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws

    async def send(self, message: str) -> None:
        try:
            await self._ws.send(message)
        except ConnectionClosed as exc:
            raise Disconnected(f"connection closed ({exc})") from exc

    async def recv(self) -> str | bytes:
        try:
            return await self._ws.recv()
        except ConnectionClosed as exc:
            raise Disconnected(f"connection closed ({exc})") from exc


def websocket_connector(ssl_context: ssl.SSLContext | None = None) -> Connector:
    """The production connector: a ``websockets`` client; TLS with ``ssl_context`` for wss."""

    @contextlib.asynccontextmanager
    async def connect(url: str, headers: Mapping[str, str]) -> AsyncIterator[Connection]:
        try:
            ws = await ws_connect(
                url,
                additional_headers=dict(headers),
                ssl=ssl_context if url.startswith("wss:") else None,
                max_size=MAX_MESSAGE_BYTES,
                open_timeout=CONNECT_TIMEOUT_SECS,
                close_timeout=2,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            reason = _reason(exc.response.body)
            if status == 401:
                raise AuthError(f"HTTP 401: {reason}") from exc
            if status == 403:
                raise Forbidden(f"HTTP 403: {reason}") from exc
            raise RunnerUnreachable(f"the runner answered HTTP {status}: {reason}") from exc
        except InvalidURI as exc:
            raise ConfigError(f"config key agent.runner_url is not usable: {exc}") from exc
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise RunnerUnreachable(f"cannot reach the runner at {url}: {exc}") from exc
        try:
            yield _WebSocketConnection(ws)
        finally:
            await ws.close()

    return connect


def _reason(body: bytes | bytearray | None) -> str:
    """One line of the runner's refusal body (``{"error": ...}`` or text)."""
    answer = parse_error_body(body)
    text = answer.error if answer.error is not None else answer.text
    return " ".join(text.split())[:300] or "no reason given"
