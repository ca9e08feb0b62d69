"""Attacks on the runner's HTTP server (docs/security.md, "HTTP limits"): trickling
connections, oversized bodies, echoed input, and inputs that used to answer 500."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from bigtent.config import Role
from bigtent.runner.http.app import uvicorn_config
from bigtent.runner.http.guard import GuardedHttpProtocol
from tests.integration.runner.conftest import (
    Drvs,
    MakeRunner,
    Nix,
    RunnerHarness,
    eventually,
    upload_closure,
)

MiB = 1024 * 1024
JSON = {"Content-Type": "application/json"}
HEADER_TIMEOUT = 1.0
CAP = 32


def _host_port(runner: RunnerHarness) -> tuple[str, int]:
    assert runner.url is not None
    host, port = runner.url.removeprefix("http://").split(":")
    return host, int(port)


@contextlib.asynccontextmanager
async def trickling(
    runner: RunnerHarness, count: int
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    """``count`` loopback connections that send a request line and then never finish the
    headers (a header byte now and then, by the caller)."""
    host, port = _host_port(runner)
    conns = []
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /cache/nix-cache-info HTTP/1.1\r\nHost: x\r\nX-Slow: a")
            conns.append((reader, writer))
        yield conns
    finally:
        for _, writer in conns:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed the connection (EOF or reset) without answering."""
    try:
        data = await asyncio.wait_for(reader.read(1024), 0.01)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    assert data == b"", f"a trickling connection got an answer: {data[:80]!r}"
    return True


def _server_protocol(runner: RunnerHarness) -> type[GuardedHttpProtocol]:
    cls = uvicorn_config(runner.app, runner.comps.config).http
    assert isinstance(cls, type) and issubclass(cls, GuardedHttpProtocol)
    return cls


async def test_trickling_connections_neither_block_the_cache_nor_stay_open(
    make_runner: MakeRunner,
) -> None:
    runner = await make_runner(
        serve=True, runner={"header_timeout_secs": HEADER_TIMEOUT, "max_connections": CAP}
    )
    assert _server_protocol(runner).max_connections == CAP
    async with (
        trickling(runner, 4 * CAP) as conns,
        httpx.AsyncClient(base_url=runner.url or "", timeout=5) as client,
    ):
        # Four times the cap of connections that never finish their headers: real requests
        # still get through, on new connections, both anonymous and authenticated.
        headers = {"Authorization": f"Bearer {runner.tokens[Role.CLIENT]}"}
        for _ in range(3):
            info = await client.get("/cache/nix-cache-info", headers={"Connection": "close"})
            assert info.status_code == 200
            assert "StoreDir: /nix/store" in info.text
            status = await client.get("/api/v1/status", headers=headers)
            assert status.status_code == 200, status.text
        # Trickling a byte does not extend the deadline: all are closed by the server.
        for _, writer in conns:
            writer.write(b"a")

        async def all_closed() -> bool:
            for _, writer in conns:
                if not writer.is_closing():
                    writer.write(b"a")
            return all([await _closed(reader) for reader, _ in conns])

        await eventually(all_closed, timeout=10 * HEADER_TIMEOUT)


async def test_idle_keep_alive_then_trickle_is_closed(make_runner: MakeRunner) -> None:
    """A kept-alive connection whose next request trickles in is closed at the header
    deadline, although uvicorn's own keep-alive timer restarts with every byte."""
    runner = await make_runner(
        serve=True, runner={"header_timeout_secs": HEADER_TIMEOUT, "keep_alive_secs": 30}
    )
    host, port = _host_port(runner)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /cache/nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await asyncio.wait_for(reader.readexactly(length), 5)
        writer.write(b"GET /cache/nix-cache-info HTTP/1.1\r\nX-Slow: ")
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def closed() -> bool:
            if not writer.is_closing():
                writer.write(b"a")
            return await _closed(reader)

        await eventually(closed, timeout=10 * HEADER_TIMEOUT)
        assert loop.time() - started >= HEADER_TIMEOUT * 0.9
    finally:
        writer.close()


async def test_huge_headers_are_refused_before_the_deadline(make_runner: MakeRunner) -> None:
    """httptools bounds no header size: 1 MiB of header is answered 431 and closed at once,
    long before the (here 60 s) header deadline."""
    runner = await make_runner(serve=True, runner={"header_timeout_secs": 60})
    host, port = _host_port(runner)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /cache/nix-cache-info HTTP/1.1\r\nX-Big: " + b"a" * MiB)
        try:
            answer = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            pass  # closed with the rest of our header unread: a reset may beat the answer
        else:
            assert answer.startswith(b"HTTP/1.1 431"), answer[:80]
    finally:
        writer.close()
    # A request whose first read carries its headers and a large body is not refused.
    async with httpx.AsyncClient(base_url=runner.url or "", timeout=10) as client:
        auth = {"Authorization": f"Bearer {runner.tokens[Role.CLIENT]}"}
        r = await client.post("/api/v1/builds", json={"drvs": ["a" * (4 * MiB)]}, headers=auth)
        assert r.status_code == 400 and "not a store path" in r.text


async def test_accept_errors_are_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import errno

    from bigtent.runner.http.guard import install_accept_error_log, rate_limited

    rate_limited._windows.clear()
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    install_accept_error_log(loop)
    try:
        with caplog.at_level(logging.ERROR, logger="bigtent.runner.http.guard"):
            for _ in range(1000):
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(errno.EMFILE, "Too many open files"),
                    }
                )
        lines = [r for r in caplog.records if "Too many open files" in r.getMessage()]
        assert len(lines) == 1
        assert lines[0].exc_info is None  # no traceback either
    finally:
        loop.set_exception_handler(previous)


# ---- request bodies -----------------------------------------------------------------------


async def test_oversized_build_with_content_length_is_refused_unread(
    make_runner: MakeRunner,
) -> None:
    """A 256 MiB ``POST /builds`` declared by its Content-Length is answered 413 after the
    headers: the client has sent 1 MiB of it and the runner still answers."""
    runner = await make_runner(serve=True)
    host, port = _host_port(runner)
    token = runner.tokens[Role.CLIENT]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"POST /api/v1/builds HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {token}\r\nContent-Length: {256 * MiB}\r\n\r\n".encode()
            + b'{"drvs": ["'
            + b"a" * MiB
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 413"), head
    finally:
        writer.close()


async def test_oversized_bodies_without_content_length_are_counted(
    make_runner: MakeRunner,
) -> None:
    runner = await make_runner(serve=True)
    sent = 0

    async def body(total: int) -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"drvs": ["'
        chunk = b"a" * MiB
        while sent < total:
            sent += len(chunk)
            yield chunk
        yield b'"]}'

    async with runner.client() as client:
        # Chunked: no Content-Length, the runner counts as it reads; 33 MiB > the 32 MiB limit.
        try:
            r = await client.post(
                "/api/v1/builds",
                content=body(33 * MiB),
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError:
            pytest.fail("the runner closed the connection instead of answering 413")
        assert r.status_code == 413, r.text
        assert r.json()["error"]
        # A small JSON route has a small limit: 2 MiB of token request is refused too.
        sent = 0
        r = await client.post(
            "/api/v1/tokens", content=body(2 * MiB), headers={"Content-Type": "application/json"}
        )
        assert r.status_code in (401, 403, 413)  # a client token may not even ask (403)
        admin = runner.client(Role.ADMIN)
        sent = 0
        r = await admin.post(
            "/api/v1/tokens", content=body(2 * MiB), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 413, r.text
        # The runner is fine afterwards.
        assert (await client.get("/api/v1/status")).status_code == 200


async def test_a_20_mib_bad_string_is_quoted_by_a_short_prefix(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    bad = "x" * (20 * MiB)
    client = runner.client()
    for body in (
        {"drvs": [bad]},  # not a store path: refused by the planner
        {"drvs": ["/nix/store/a.drv"], "ref": bad},  # too long a field: a validation error
        {"drvs": ["/nix/store/a.drv"], bad: 1, "priority": {bad: bad}},  # a key in the location
    ):
        r = await client.post("/api/v1/builds", content=json.dumps(body), headers=JSON)
        assert 400 <= r.status_code < 500, r.text[:300]
        assert len(r.content) < 20_000, f"{len(r.content)} bytes of error"
    r = await client.post(
        "/api/v1/builds", content=b'{"drvs": ["' + b"\xff" * (20 * MiB) + b'"]}', headers=JSON
    )
    assert 400 <= r.status_code < 500
    assert len(r.content) < 20_000


# ---- inputs that answered 500 ---------------------------------------------------------------


async def test_a_nar_name_longer_than_a_file_name_is_404(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    client = runner.client(None)
    for name in ("a" * 256 + ".nar.zst", "a" * 4000, "é" * 200):
        r = await client.get(f"/cache/nar/{name}")
        assert r.status_code == 404, (name[:10], r.status_code)
        r = await client.head(f"/cache/nar/{name}")
        assert r.status_code == 404


@pytest.mark.nix
async def test_huge_numbers_in_log_offsets_are_not_500(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    """``Range``, ``Last-Event-ID`` and ``?from=`` with more digits than Python converts."""
    runner = await make_runner(serve=True)  # served: the events stream is read as it comes
    await upload_closure(runner, nix, drvs.closure)
    made = await runner.client().post("/api/v1/builds", json={"drvs": [drvs.top]})
    assert made.status_code == 201, made.text
    step_id = next(iter(runner.comps.scheduler.nodes))
    runner.comps.logs.append(step_id, ["a line of log"])
    size = runner.comps.logs.size(step_id)
    huge = "9" * 5000
    for client, url in (
        (runner.client(None), f"/steps/{step_id}/log"),
        (runner.client(), f"/api/v1/steps/{step_id}/log"),
    ):
        r = await client.get(url, headers={"Range": f"bytes={huge}-"})
        assert r.status_code == 416
        r = await client.get(url, headers={"Range": f"bytes=0-{huge}"})
        assert r.status_code == 206 and len(r.content) == size
        r = await client.get(url, headers={"Range": f"bytes=-{huge}"})
        assert r.status_code == 206 and len(r.content) == size
        r = await client.get(url, headers={"Range": f"bytes={huge}-{huge}"})
        assert r.status_code == 416
    viewer = runner.client(None)
    for headers, query, first in (
        ({"Last-Event-ID": huge}, "", "event: reset"),  # past the end: the log starts afresh
        ({}, f"?from={huge}", "event: reset"),
        ({}, "?from=\u00b2", "event: log"),  # a digit to str.isdigit, not to int(): ignored
    ):
        async with viewer.stream("GET", f"/steps/{step_id}/events{query}", headers=headers) as r:
            assert r.status_code == 200
            events = r.aiter_lines()
            line = ""
            while not line.startswith("event:"):
                line = await anext(events)
            assert line == first
