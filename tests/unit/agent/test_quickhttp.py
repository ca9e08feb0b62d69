"""GETs from the cache on kept-alive connections (``agent/quickhttp.py``), against a real
loopback server that answers with canned raw HTTP."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from bigtent.agent.drvfetch import MAX_DRV_BYTES, DrvCache
from bigtent.agent.quickhttp import (
    BodyTooLarge,
    Head,
    QuickHttp,
    body_length,
    encode_request,
    parse_head,
)
from bigtent.agent.upload import UploadError, Uploads
from bigtent.nix.base32 import format_hash
from bigtent.nix.store_path import StorePath

from .test_drvfetch import DRV_PATH, TEXT, nar_of

NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


def ok(body: bytes, *extra: str) -> bytes:
    head = ["HTTP/1.1 200 OK", f"content-length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunked(*parts: bytes) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body


@dataclass
class Server:
    """Answers each request with ``answers[path]`` (raw bytes; a callable may close)."""

    answers: dict[str, bytes | Callable[[], bytes | None]]
    requests: list[str] = field(default_factory=list)
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    port: int = 0
    close_after: bool = False
    """Close each connection after its first answer."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1].decode()
                self.requests.append(path)
                self.heads.append(head)
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                self.bodies.append(await reader.readexactly(length))
                answer = self.answers.get(path, NOT_FOUND)
                raw = answer() if callable(answer) else answer
                if raw is None:
                    break
                writer.write(raw)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def drop_connections(self) -> None:
        for writer in self.writers:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server({})
    tcp = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    srv.port = tcp.sockets[0].getsockname()[1]
    async with tcp:
        yield srv
        srv.drop_connections()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3", Head(200, {"content-length": "3"}, True)),
        (b"HTTP/1.1 404 Not Found\r\nConnection: close", Head(404, {"connection": "close"}, False)),
        (b"HTTP/1.0 200 OK", Head(200, {}, False)),
        (
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive",
            Head(200, {"connection": "Keep-Alive"}, True),
        ),
        (b"HTTP/1.1 200 OK\r\nA: 1\r\na: 2", Head(200, {"a": "1, 2"}, True)),
    ],
)
def test_parse_head(raw: bytes, expected: Head) -> None:
    assert parse_head(raw) == expected


@pytest.mark.parametrize(
    "raw", [b"SSH-2.0-OpenSSH", b"HTTP/2 200", b"HTTP/1.1 abc", b"HTTP/1.1 200 OK\r\nno colon"]
)
def test_parse_head_refuses(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_head(raw)


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, {"content-length": "12"}, 12),
        (200, {"transfer-encoding": "chunked"}, None),
        (204, {}, 0),
        (304, {}, 0),
        (200, {}, ValueError),
        (200, {"transfer-encoding": "gzip"}, ValueError),
        (200, {"content-length": "-1"}, ValueError),
    ],
)
def test_body_length(status: int, headers: dict[str, str], expected: int | type | None) -> None:
    head = Head(status, headers, True)
    if isinstance(expected, type):
        with pytest.raises(expected):
            body_length(head)
    else:
        assert body_length(head) == expected


async def test_gets_on_one_kept_alive_connection(server: Server) -> None:
    server.answers = {"/a": ok(b"alpha"), "/b": chunked(b"be", b"ta")}
    getter = QuickHttp()
    try:
        assert await getter.get(server.url("/a"), 100) == (200, b"alpha")
        assert await getter.get(server.url("/b"), 100) == (200, b"beta")
        assert await getter.get(server.url("/c"), 100) == (404, b"")
        assert server.requests == ["/a", "/b", "/c"]
        assert server.connections == 1 == getter.connections_made
    finally:
        await getter.aclose()


async def test_concurrent_gets_use_several_connections(server: Server) -> None:
    server.answers = {f"/{i}": ok(str(i).encode()) for i in range(4)}
    getter = QuickHttp()
    try:
        got = await asyncio.gather(*(getter.get(server.url(f"/{i}"), 100) for i in range(4)))
        assert got == [(200, str(i).encode()) for i in range(4)]
        made = getter.connections_made
        assert await getter.get(server.url("/0"), 100) == (200, b"0")
        assert getter.connections_made == made  # an idle one was reused
    finally:
        await getter.aclose()


async def test_connection_close_is_honoured(server: Server) -> None:
    server.answers = {"/a": ok(b"x", "connection: close")}
    getter = QuickHttp()
    try:
        assert await getter.get(server.url("/a"), 100) == (200, b"x")
        assert await getter.get(server.url("/a"), 100) == (200, b"x")
        assert getter.connections_made == 2
    finally:
        await getter.aclose()


async def test_a_connection_the_server_closed_is_replaced(server: Server) -> None:
    calls = 0

    def first_then_close() -> bytes | None:
        nonlocal calls
        calls += 1
        return ok(b"fresh") if calls != 2 else None  # the 2nd request finds it closed

    server.answers = {"/a": first_then_close}
    getter = QuickHttp()
    try:
        assert await getter.get(server.url("/a"), 100) == (200, b"fresh")
        assert await getter.get(server.url("/a"), 100) == (200, b"fresh")
        assert getter.connections_made == 2
    finally:
        await getter.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 302 Found\r\nlocation: http://bucket/x\r\ncontent-length: 0\r\n\r\n",
        b"not http at all\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",  # then the server closes
    ],
)
async def test_what_it_does_not_take_is_left_to_httpx(server: Server, answer: bytes) -> None:
    sent = 0

    def once() -> bytes | None:
        nonlocal sent
        sent += 1
        return answer if sent == 1 else None

    server.answers = {"/a": once}
    server.close_after = True
    getter = QuickHttp()
    try:
        assert await getter.get(server.url("/a"), 100) is None
    finally:
        await getter.aclose()


async def test_a_body_over_the_limit_is_refused(server: Server) -> None:
    server.answers = {"/a": ok(b"x" * 101), "/b": chunked(b"x" * 60, b"x" * 60)}
    getter = QuickHttp()
    try:
        with pytest.raises(BodyTooLarge):
            await getter.get(server.url("/a"), 100)
        with pytest.raises(BodyTooLarge):
            await getter.get(server.url("/b"), 100)
    finally:
        await getter.aclose()


async def test_no_server_and_other_schemes_are_left_to_httpx(server: Server) -> None:
    getter = QuickHttp()
    server.drop_connections()
    with_nothing = f"http://127.0.0.1:{_closed_port()}/a"
    assert await getter.get(with_nothing, 100) is None
    assert await getter.get("ftp://127.0.0.1/a", 100) is None
    assert await getter.get("http://user@127.0.0.1/a", 100) is None


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_drv_cache_reads_through_the_getter_and_falls_back_on_redirect(
    server: Server,
) -> None:
    nar = nar_of(TEXT.encode())
    hash_part = StorePath.parse(DRV_PATH).hash_part
    info = (
        f"StorePath: {DRV_PATH}\nURL: nar/x.nar\nCompression: none\n"
        f"NarHash: {format_hash('sha256', hashlib.sha256(nar).digest())}\n"
        f"NarSize: {len(nar)}\nReferences: 1b9p07z77phvv2hf6gm9f28syp39f1ag-src\n"
    ).encode()
    server.answers = {
        f"/cache/{hash_part}.narinfo": ok(info),
        # The NAR lives elsewhere (a bucket): httpx follows the redirect.
        "/cache/nar/x.nar": (
            f"HTTP/1.1 307 Temporary Redirect\r\nlocation: {server.url('/bucket/x.nar')}\r\n"
            "content-length: 0\r\n\r\n"
        ).encode(),
        "/bucket/x.nar": ok(nar),
    }
    getter = QuickHttp()
    async with httpx.AsyncClient() as http:
        cache = DrvCache(http, quick=getter)
        try:
            drv = await cache.get(server.url("/cache"), DRV_PATH)
        finally:
            await getter.aclose()
    assert drv.system == "x86_64-linux"
    # narinfo and the redirect by the getter, then httpx asks again and follows it
    assert server.requests == [
        f"/cache/{hash_part}.narinfo",
        "/cache/nar/x.nar",
        "/cache/nar/x.nar",
        "/bucket/x.nar",
    ]
    assert len(nar) < MAX_DRV_BYTES


@pytest.mark.parametrize(
    ("method", "target", "headers", "body", "expected"),
    [
        (
            "GET",
            "/cache/x.narinfo",
            {},
            b"",
            b"GET /cache/x.narinfo HTTP/1.1\r\nHost: h:1\r\nAccept-Encoding: identity\r\n"
            b"User-Agent: bigtent-agent\r\n\r\n",
        ),
        (
            "PUT",
            "/up",
            {"Content-Length": "99", "X-A": "b"},
            b"nar",
            b"PUT /up HTTP/1.1\r\nHost: h:1\r\nAccept-Encoding: identity\r\n"
            b"User-Agent: bigtent-agent\r\nX-A: b\r\nContent-Length: 3\r\n\r\nnar",
        ),
        ("GET", "/a b", {}, b"", None),
        ("GET", "/\u00e9", {}, b"", None),
        ("PUT", "/up", {"X-A": "b\r\nX-Evil: 1"}, b"", None),
        ("PUT", "/up", {"X A": "b"}, b"", None),
    ],
)
def test_encode_request(
    method: str, target: str, headers: dict[str, str], body: bytes, expected: bytes | None
) -> None:
    assert encode_request(method, target, "h:1", headers, body) == expected


def _uploads(server: Server, quick: QuickHttp, http: httpx.AsyncClient) -> Uploads:
    from pathlib import Path

    return Uploads(
        runner_url=server.url(""),
        work_dir=Path("/nonexistent"),
        http=http,
        credentials=None,
        rand=lambda: 0.5,
        quick=quick,
    )


def _answer(status: int, body: bytes) -> bytes:
    return f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body


async def test_an_output_put_goes_over_the_kept_alive_connection(server: Server) -> None:
    server.answers = {
        "/ok": _answer(200, b'{"references": []}'),
        "/busy": _answer(503, b'{"error": "busy"}'),
        "/stale": _answer(409, b'{"error": "lease not current"}'),
    }
    quick = QuickHttp()
    async with httpx.AsyncClient() as http:
        uploads = _uploads(server, quick, http)
        headers = {"Authorization": "Bearer t", "Content-Type": "application/x-nix-nar"}
        try:
            ok_answer = await uploads.send(
                "PUT", server.url("/ok"), "out", headers=headers, content=b"nar"
            )
            assert isinstance(ok_answer, httpx.Response)
            assert ok_answer.json() == {"references": []}
            busy = await uploads.send(
                "PUT", server.url("/busy"), "out", headers=headers, content=b"n"
            )
            assert isinstance(busy, str) and "HTTP 503" in busy  # tried again by the caller
            with pytest.raises(UploadError, match="HTTP 409: lease not current"):
                await uploads.send(
                    "PUT", server.url("/stale"), "out", headers=headers, content=b"n"
                )
        finally:
            await quick.aclose()
    assert server.bodies == [b"nar", b"n", b"n"]
    assert b"Authorization: Bearer t\r\n" in server.heads[0]
    assert server.connections == 1 == quick.connections_made
