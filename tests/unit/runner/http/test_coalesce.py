"""A response's start goes out with its body in one socket write (``coalesce``), on uvicorn's
own request/response cycle; a start whose body is not ready goes out by itself at once."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from bigtent.runner.http.coalesce import hold_response_start


class Transport(asyncio.Transport):
    """What the socket would see: each write, and the close among them."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[bytes | str] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "a write after the close"
        self.events.append(bytes(data))

    def close(self) -> None:
        self.closed = True
        self.events.append("close")

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def cycle(transport: Transport, *, keep_alive: bool = True, method: str = "GET") -> Any:
    scope: Any = {"type": "http", "method": method, "http_version": "1.1", "path": "/"}
    made = RequestResponseCycle(
        scope=scope,
        transport=transport,
        flow=FlowControl(transport),
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: None,
    )
    hold_response_start(made, asyncio.get_running_loop())
    return made


START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]}
BODY = {"type": "http.response.body", "body": b"hello", "more_body": False}


async def test_start_and_body_are_one_write() -> None:
    transport = Transport()
    c = cycle(transport)
    await c.send(START)
    await c.send(BODY)
    assert len(transport.events) == 1
    data = transport.events[0]
    assert isinstance(data, bytes)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\nhello")
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert len(transport.events) == 1


async def test_a_start_whose_body_waits_goes_out_by_itself() -> None:
    transport = Transport()
    c = cycle(transport)
    await c.send(START)
    assert transport.events == []
    await asyncio.sleep(0)  # the loop runs its callbacks: the start is written
    assert len(transport.events) == 1
    assert isinstance(transport.events[0], bytes) and transport.events[0].endswith(b"\r\n\r\n")
    await c.send(BODY)
    assert transport.events[1:] == [b"hello"]


async def test_a_closing_response_writes_before_it_closes() -> None:
    transport = Transport()
    c = cycle(transport, keep_alive=False)
    await c.send(START)
    await c.send(BODY)
    assert len(transport.events) == 2 and transport.events[1] == "close"
    assert isinstance(transport.events[0], bytes) and b"connection: close" in transport.events[0]


async def test_a_streamed_body_after_the_first_chunk_is_written_as_sent() -> None:
    transport = Transport()
    c = cycle(transport)
    chunked = {"type": "http.response.start", "status": 200, "headers": []}
    await c.send(chunked)
    await c.send({"type": "http.response.body", "body": b"ab", "more_body": True})
    await c.send({"type": "http.response.body", "body": b"cd", "more_body": True})
    await c.send({"type": "http.response.body", "body": b"", "more_body": False})
    assert len(transport.events) == 3
    first = transport.events[0]
    assert isinstance(first, bytes) and first.endswith(b"\r\n\r\n2\r\nab\r\n")
    assert transport.events[1:] == [b"2\r\ncd\r\n", b"0\r\n\r\n"]


async def test_head_answer_is_one_write() -> None:
    transport = Transport()
    c = cycle(transport, method="HEAD")
    await c.send(START)
    await c.send({"type": "http.response.body", "body": b"", "more_body": False})
    assert len(transport.events) == 1
    assert isinstance(transport.events[0], bytes)
    assert transport.events[0].endswith(b"content-length: 5\r\n\r\n")
