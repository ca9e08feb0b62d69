"""A response's start and its body in one write to the socket.

uvicorn writes a response's status line and headers as soon as the application sends
``http.response.start``, and the body at ``http.response.body``: two ``send(2)`` calls for
every small answer (a narinfo, a small NAR, an upload's JSON). On loopback, where agents and
Nix's substituter often are, each of them also runs the receiver's TCP processing in the
sender: the socket writes were a fifth of the runner's event-loop CPU in the DAG benchmark,
two thirds of them the hot routes' answers.

``hold_response_start`` keeps the start's bytes back until the body's first write, which
takes them along. An application that sends the start and then waits (a stream whose first
chunk is not ready) does not hold the client back: the bytes go out when the event loop next
runs its callbacks, before any other waiting (``loop.call_soon``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

START = "http.response.start"


class _Held:
    """The cycle's transport while a message of its response is written: the bytes (and a
    close) are kept for the caller to pass on."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.data: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def close(self) -> None:
        self.closing = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def hold_response_start(cycle: RequestResponseCycle, loop: asyncio.AbstractEventLoop) -> None:
    """Make ``cycle`` write its response's start together with the first body bytes."""
    transport = cycle.transport
    plain_send = cycle.send
    pending: list[bytes] = []

    def flush() -> None:
        if pending and not transport.is_closing():
            transport.write(b"".join(pending))
        pending.clear()

    async def send(message: Any) -> None:
        starting = message["type"] == START and not cycle.response_started
        if not starting and not pending:
            await plain_send(message)
            return
        held = _Held(transport)
        cycle.transport = held  # type: ignore[assignment]
        try:
            await plain_send(message)
        finally:
            cycle.transport = transport
        pending.extend(held.data)
        if starting and not held.closing:
            loop.call_soon(flush)
        else:
            flush()
        if held.closing:
            transport.close()

    cycle.send = send  # type: ignore[method-assign]
