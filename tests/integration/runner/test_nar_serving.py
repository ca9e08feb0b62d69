"""NAR files served by a real uvicorn on a loopback socket: a small one asked whole read at
once, on any connection; others sent by the kernel (``sendfile``, ``runner/http/pathsend.py``)
on plain TCP and streamed by ``FileResponse`` on TLS; byte for byte, with keep-alive framing
intact and the same headers either way."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop
from starlette.responses import FileResponse

from bigtent.runner.http.pathsend import can_sendfile
from bigtent.runner.http.routes.cache import SMALL_NAR_BYTES, _read_whole
from tests.integration.runner.conftest import MakeRunner, RunnerHarness
from tests.integration.runner.test_mtls import Ca

MiB = 1024 * 1024


def _put(runner: RunnerHarness, name: str, data: bytes, *, mtime: int | None = None) -> None:
    path = runner.state_dir / "cache" / "nar" / name
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


@pytest.fixture
async def sendfile_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte counts the running loop's ``sendfile`` was asked to send."""
    loop = asyncio.get_running_loop()
    real = loop.sendfile
    calls: list[int] = []

    async def spy(transport: Any, file: Any, offset: int = 0, count: int | None = None) -> int:
        calls.append(count or 0)
        return await real(transport, file, offset, count)

    monkeypatch.setattr(loop, "sendfile", spy)
    return calls


@pytest.mark.parametrize("size", [0, 1, 200 * 1024, SMALL_NAR_BYTES + 1, 3 * MiB + 17])
async def test_nar_files_go_out_whole_and_framed(
    make_runner: MakeRunner, sendfile_calls: list[int], size: int
) -> None:
    runner = await make_runner(serve=True)
    data = random.Random(size).randbytes(size)
    _put(runner, "a.nar", data)
    _put(runner, "b.nar", b"second")
    async with httpx.AsyncClient(base_url=runner.url or "", timeout=30) as client:
        # Twice on one kept-alive connection, then another file: each response is framed
        # exactly (a short or long body would corrupt the next one).
        for _ in range(2):
            r = await client.get("/cache/nar/a.nar")
            assert r.status_code == 200
            assert r.headers["content-length"] == str(size)
            assert r.content == data
        r = await client.get("/cache/nar/b.nar")
        assert r.content == b"second"
        head = await client.head("/cache/nar/a.nar")
        assert head.status_code == 200
        assert head.headers["content-length"] == str(size)
        assert head.content == b""
        # A small file read at once carries FileResponse's headers, as a large one does.
        got = await client.get("/cache/nar/a.nar")
        assert _without_date(got.headers) == _without_date(head.headers)
        assert {"etag", "last-modified", "accept-ranges"} <= set(got.headers)
    # Large files go out by sendfile; small ones (b.nar too) are read at once; HEAD never
    # sends a body.
    assert sendfile_calls == ([size] * 3 if size > SMALL_NAR_BYTES else [])


def _without_date(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != "date"}


async def test_a_range_of_a_nar_is_still_served(make_runner: MakeRunner) -> None:
    runner = await make_runner(serve=True)
    data = random.Random(3).randbytes(MiB)
    _put(runner, "r.nar", data)
    async with httpx.AsyncClient(base_url=runner.url or "", timeout=30) as client:
        r = await client.get("/cache/nar/r.nar", headers={"Range": "bytes=100-199"})
        assert r.status_code == 206
        assert r.content == data[100:200]
        missing = await client.get("/cache/nar/none.nar")
        assert missing.status_code == 404


async def test_without_the_extension_nars_are_streamed(make_runner: MakeRunner) -> None:
    # Through the ASGI transport (no server protocol, so no pathsend): the same bytes.
    runner = await make_runner()
    for size in (10, 300 * 1024):
        data = random.Random(size).randbytes(size)
        _put(runner, f"s{size}.nar", data)
        r = await runner.client(None).get(f"/cache/nar/s{size}.nar")
        assert r.status_code == 200
        assert r.content == data


async def test_sendfile_is_offered_only_on_plain_tcp_of_asyncios_loop() -> None:
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        assert can_sendfile(loop, writer.transport)

        class Tls(asyncio.Transport):
            def get_extra_info(self, name: str, default: Any = None) -> Any:
                return object() if name in ("sslcontext", "socket") else default

        assert not can_sendfile(loop, Tls())
        other = uvloop.new_event_loop()  # it has no sendfile of its own
        try:
            assert not can_sendfile(other, writer.transport)
        finally:
            other.close()
        writer.close()
    finally:
        server.close()


async def test_a_client_leaving_mid_file_breaks_nothing(
    make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
) -> None:
    runner = await make_runner(serve=True)
    size = 64 * MiB  # more than the socket buffers hold: the send is cut off midway
    with (runner.state_dir / "cache" / "nar" / "big.nar").open("wb") as f:
        f.truncate(size)
    assert runner.url is not None
    host, port = runner.url.removeprefix("http://").split(":")
    for _ in range(3):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /cache/nar/big.nar HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(4096)
        writer.close()
    async with httpx.AsyncClient(base_url=runner.url, timeout=30) as client:
        r = await client.get("/cache/nix-cache-info")
        assert r.status_code == 200
    assert not [x for x in caplog.records if x.levelno >= logging.ERROR]


async def test_a_file_shorter_than_its_length_is_never_taken_whole(
    make_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = await make_runner(serve=True)
    _put(runner, "shrinking.nar", b"x" * MiB)
    loop = asyncio.get_running_loop()
    real = loop.sendfile

    async def short(transport: Any, file: Any, offset: int = 0, count: int | None = None) -> int:
        # As if the file shrank between its stat and its sending.
        return await real(transport, file, offset, (count or 1) - 1)

    monkeypatch.setattr(loop, "sendfile", short)
    async with httpx.AsyncClient(base_url=runner.url or "", timeout=30) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/cache/nar/shrinking.nar")
        # The connection was closed; the next request gets a new one.
        assert (await client.get("/cache/nix-cache-info")).status_code == 200


def test_a_small_file_changed_since_its_stat_is_left_to_file_response(tmp_path: Path) -> None:
    nar = tmp_path / "x.nar"
    nar.write_bytes(b"abc")
    response = FileResponse(nar, stat_result=nar.stat())
    whole = _read_whole(response, nar, 3)
    assert whole is not None and whole.body == b"abc"
    assert whole.raw_headers == response.raw_headers
    nar.write_bytes(b"abcd")
    assert _read_whole(response, nar, 3) is None
    nar.unlink()
    assert _read_whole(response, nar, 3) is None


@pytest.fixture
def server_tls(tmp_path: Path) -> tuple[dict[str, Any], ssl.SSLContext]:
    """A ``[runner.tls]`` section for 127.0.0.1, and a client context that trusts it."""
    directory = tmp_path / "pki"
    directory.mkdir()
    ca = Ca.create(directory, "server CA")
    cert, key = ca.issue(directory, "server", cn="localhost", dns=["localhost"], server=True)
    context = ssl.create_default_context(cafile=str(ca.cert_file))
    return {"cert_file": str(cert), "key_file": str(key)}, context


@pytest.mark.parametrize("size", [0, 300, SMALL_NAR_BYTES, SMALL_NAR_BYTES + 1, 3 * MiB + 17])
async def test_tls_and_plain_tcp_answer_a_nar_alike(
    make_runner: MakeRunner,
    sendfile_calls: list[int],
    server_tls: tuple[dict[str, Any], ssl.SSLContext],
    size: int,
) -> None:
    tls, context = server_tls
    plain = await make_runner(serve=True)
    secure = await make_runner(serve=True, tls=tls)
    assert (secure.url or "").startswith("https://")
    data = random.Random(size).randbytes(size)
    for runner in (plain, secure):
        _put(runner, "n.nar", data, mtime=1_700_000_000)  # the same etag and last-modified
    answers: dict[str, list[httpx.Response]] = {}
    async with (
        httpx.AsyncClient(base_url=plain.url or "", timeout=30) as tcp,
        httpx.AsyncClient(base_url=secure.url or "", timeout=30, verify=context) as tls_client,
    ):
        for name, client in (("tcp", tcp), ("tls", tls_client)):
            answers[name] = [
                await client.get("/cache/nar/n.nar"),
                await client.head("/cache/nar/n.nar"),
                await client.get("/cache/nar/n.nar", headers={"Range": "bytes=0-99"}),
            ]
    for (got, head, ranged), name in ((answers["tcp"], "tcp"), (answers["tls"], "tls")):
        assert got.status_code == 200, name
        assert got.content == data, name
        assert got.headers["content-type"] == "application/x-nix-nar"
        assert got.headers["content-length"] == str(size)
        assert {"etag", "last-modified", "accept-ranges"} <= set(got.headers)
        assert head.status_code == 200 and head.content == b""
        assert _without_date(head.headers) == _without_date(got.headers)
        if size:
            assert ranged.status_code == 206
            assert ranged.content == data[:100]
            assert ranged.headers["content-range"] == f"bytes 0-{min(size, 100) - 1}/{size}"
        else:
            assert ranged.status_code == 416  # no byte of an empty file is in any range
    for tcp_answer, tls_answer in zip(answers["tcp"], answers["tls"], strict=True):
        assert tcp_answer.status_code == tls_answer.status_code
        assert _without_date(tcp_answer.headers) == _without_date(tls_answer.headers)
        assert tcp_answer.content == tls_answer.content
    # Only plain TCP offers sendfile, and only a large file asked whole goes out by it (a
    # range is read by FileResponse); the TLS runner streamed its large file instead.
    assert sendfile_calls == ([size] if size > SMALL_NAR_BYTES else [])
