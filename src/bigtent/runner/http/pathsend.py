"""Files sent by the kernel: the ASGI ``http.response.pathsend`` extension on the runner's HTTP
protocol.

uvicorn does not offer the extension, so Starlette's ``FileResponse`` reads a file in 64 KiB
chunks, one worker-thread hop and one trip through every middleware each, and copies each
chunk through Python into the socket. The runner's protocol (``guard.GuardedHttpProtocol``)
offers it on a plain TCP connection of asyncio's own event loop, and answers a ``pathsend``
message with ``loop.sendfile`` (``sendfile(2)``: no copy through the process, no thread). NAR
files are served this way (``routes/cache.py``). On TLS, or another event loop, the extension
is not offered and ``FileResponse`` streams the file as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

log = logging.getLogger(__name__)

PATHSEND = "http.response.pathsend"

Send = Callable[[Any], Awaitable[None]]


def can_sendfile(loop: asyncio.AbstractEventLoop, transport: asyncio.BaseTransport) -> bool:
    """True when ``loop.sendfile`` sends from the kernel on ``transport``: asyncio's own loop
    (other loops, uvloop among them, do not implement it) and a plain TCP socket (not TLS)."""
    return (
        isinstance(loop, asyncio.BaseEventLoop)
        and transport.get_extra_info("sslcontext") is None
        and transport.get_extra_info("socket") is not None
    )


def offer_pathsend(cycle: RequestResponseCycle, loop: asyncio.AbstractEventLoop) -> None:
    """Offer ``http.response.pathsend`` to the application serving ``cycle`` (a request whose
    headers are complete), and answer it with ``sendfile``."""
    if not can_sendfile(loop, cycle.transport):
        return
    cycle.scope.setdefault("extensions", {})[PATHSEND] = {}
    plain_send: Send = cycle.send

    async def send(message: Any) -> None:
        if message["type"] != PATHSEND:
            await plain_send(message)
            return
        await _send_path(cycle, plain_send, message["path"], loop)

    cycle.send = send  # type: ignore[method-assign]


async def _send_path(
    cycle: RequestResponseCycle, plain_send: Send, path: str, loop: asyncio.AbstractEventLoop
) -> None:
    """The body of a response whose start is sent: file ``path``, by ``sendfile``, for the
    ``content-length`` the start declared."""
    if cycle.disconnected or cycle.transport.is_closing():
        return  # the client went away (sendfile would refuse a closing transport)
    if not cycle.response_started or cycle.response_complete or cycle.chunked_encoding:
        raise RuntimeError("http.response.pathsend needs a started response with a length")
    count = cycle.expected_content_length
    with open(path, "rb") as file:  # an open, not a read: no thread hop
        if count:
            if cycle.flow.write_paused:
                await cycle.flow.drain()
            try:
                sent = await loop.sendfile(cycle.transport, file, 0, count)
            except ConnectionError:
                sent = -1  # the client went away
            if sent != count:
                if sent >= 0:
                    # The file shrank under the response: the client must not take it whole.
                    log.warning("%s: sent %d of %d bytes; connection closed", path, sent, count)
                # The response cannot be completed: the connection ends here, as uvicorn ends
                # one whose client left.
                cycle.disconnected = True
                cycle.transport.close()
                return
    cycle.expected_content_length = 0
    await plain_send({"type": "http.response.body", "body": b"", "more_body": False})
