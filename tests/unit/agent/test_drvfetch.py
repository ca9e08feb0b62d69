"""Reading a .drv from a binary cache without Nix: NAR, compression, path check, LRU."""

from __future__ import annotations

import asyncio
import hashlib
import io
import lzma
from collections.abc import Awaitable, Callable

import httpx
import pytest
import zstandard

from bigtent.agent.build import plain_error
from bigtent.agent.drvfetch import DrvCache, DrvFetchError, decompress, drv_from_nar
from bigtent.nix.base32 import format_hash
from bigtent.nix.store_path import StorePath, make_text_path

TEXT = (
    'Derive([("out","/nix/store/9krlzvny65gdc8s7kpb6lkx8cd02c25c-hello","","")],[],'
    '["/nix/store/1b9p07z77phvv2hf6gm9f28syp39f1ag-src"],"x86_64-linux","/bin/sh",'
    '["-c","echo hi > $out"],[("out","/nix/store/9krlzvny65gdc8s7kpb6lkx8cd02c25c-hello")])'
)
DRV_PATH = make_text_path(
    "hello.drv",
    hashlib.sha256(TEXT.encode()).digest(),
    ["/nix/store/1b9p07z77phvv2hf6gm9f28syp39f1ag-src"],
)


def _s(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + b"\0" * (-len(data) % 8)


def nar_of(content: bytes) -> bytes:
    return b"".join(
        _s(x) for x in [b"nix-archive-1", b"(", b"type", b"regular", b"contents", content, b")"]
    )


def test_drv_from_nar_checks_the_path() -> None:
    drv, size = drv_from_nar(DRV_PATH, nar_of(TEXT.encode()))
    assert drv.builder == "/bin/sh" and size == len(TEXT)
    other = TEXT.replace("echo hi", "echo ho")
    with pytest.raises(DrvFetchError, match="contents served are those of"):
        drv_from_nar(DRV_PATH, nar_of(other.encode()))
    with pytest.raises(DrvFetchError, match="bad NAR"):
        drv_from_nar(DRV_PATH, b"garbage")


@pytest.mark.parametrize("compression", ["none", "zstd", "xz"])
def test_decompress(compression: str) -> None:
    data = b"x" * 1000
    packed = {
        "none": data,
        "zstd": zstandard.ZstdCompressor().compress(data),
        "xz": lzma.compress(data),
    }[compression]
    assert decompress(packed, compression) == data
    with pytest.raises(DrvFetchError, match="unsupported"):
        decompress(data, "bzip2")


def _zstd_stream(data: bytes) -> bytes:
    out = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as w:
        w.write(data)
    return out.getvalue()


async def test_cache_fetches_once_and_evicts() -> None:
    nar = nar_of(TEXT.encode())
    packed = _zstd_stream(nar)
    hash_part = StorePath.parse(DRV_PATH).hash_part
    requests: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request.url.path)
        if request.url.path == f"/cache/{hash_part}.narinfo":
            body = (
                f"StorePath: {DRV_PATH}\nURL: nar/x.nar.zst\nCompression: zstd\n"
                f"NarHash: {format_hash('sha256', hashlib.sha256(nar).digest())}\n"
                f"NarSize: {len(nar)}\nReferences: 1b9p07z77phvv2hf6gm9f28syp39f1ag-src\n"
            )
            return httpx.Response(200, text=body)
        if request.url.path == "/cache/nar/x.nar.zst":
            return httpx.Response(200, content=packed)
        return httpx.Response(404)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        cache = DrvCache(http, max_entries=1)
        drv = await cache.get("http://runner/cache/", DRV_PATH)
        assert drv.system == "x86_64-linux"
        assert await cache.get("http://runner/cache", DRV_PATH) is drv
        assert len(requests) == 2 and cache.fetches == 1
        missing = "/nix/store/0c0cpvvp4h5xmmnc2ymbiqzlp2ihh7gk-dep.drv"
        with pytest.raises(DrvFetchError, match="not in the cache"):
            await cache.get("http://runner/cache", missing)
        assert len(cache) == 1


def test_plain_error_strips_colours() -> None:
    assert plain_error("\x1b[31;1merror:\x1b[0m builder failed") == "error: builder failed"
    assert plain_error("boom") == "error: boom"


TOP_TEXT = (
    'Derive([("out","/nix/store/0c0cpvvp4h5xmmnc2ymbiqzlp2ihh7gk-top","","")],'
    f'[("{DRV_PATH}",["out"])],[],"x86_64-linux","/bin/sh",["-c","true"],'
    '[("out","/nix/store/0c0cpvvp4h5xmmnc2ymbiqzlp2ihh7gk-top")])'
)
TOP_PATH = make_text_path("top.drv", hashlib.sha256(TOP_TEXT.encode()).digest(), [DRV_PATH])


def _narinfo(path: str, nar: bytes, nar_url: str, refs: list[str]) -> str:
    return (
        f"StorePath: {path}\nURL: {nar_url}\nCompression: none\n"
        f"NarHash: {format_hash('sha256', hashlib.sha256(nar).digest())}\n"
        f"NarSize: {len(nar)}\nReferences: {' '.join(refs)}\n"
    )


def _serve_two(
    on_top_nar: Callable[[], Awaitable[None]] | None = None,
) -> tuple[httpx.MockTransport, list[str]]:
    """A cache with TOP_PATH, whose input derivation is DRV_PATH."""
    files = {
        TOP_PATH: (nar_of(TOP_TEXT.encode()), [StorePath.parse(DRV_PATH).basename]),
        DRV_PATH: (nar_of(TEXT.encode()), ["1b9p07z77phvv2hf6gm9f28syp39f1ag-src"]),
    }
    requests: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request.url.path)
        for path, (nar, refs) in files.items():
            hash_part = StorePath.parse(path).hash_part
            if request.url.path == f"/cache/{hash_part}.narinfo":
                return httpx.Response(200, text=_narinfo(path, nar, f"nar/{hash_part}.nar", refs))
            if request.url.path == f"/cache/nar/{hash_part}.nar":
                if path == TOP_PATH and on_top_nar is not None:
                    await on_top_nar()
                return httpx.Response(200, content=nar)
        return httpx.Response(404)

    return httpx.MockTransport(handler), requests


async def test_input_derivations_are_fetched_while_the_nar_is() -> None:
    input_asked = asyncio.Event()
    input_narinfo = f"/cache/{StorePath.parse(DRV_PATH).hash_part}.narinfo"

    async def top_nar() -> None:
        # The top's NAR is answered only once its input's narinfo has been asked for.
        await asyncio.wait_for(input_asked.wait(), 10)

    transport, requests = _serve_two(top_nar)
    original = transport.handle_async_request

    async def watching(request: httpx.Request) -> httpx.Response:
        if request.url.path == input_narinfo:
            input_asked.set()
        return await original(request)

    transport.handle_async_request = watching  # type: ignore[method-assign]
    async with httpx.AsyncClient(transport=transport) as http:
        cache = DrvCache(http)
        top = await cache.get("http://runner/cache", TOP_PATH)
        assert list(top.input_drvs) == [DRV_PATH]
        dep = await cache.get("http://runner/cache", DRV_PATH)
        assert dep.system == "x86_64-linux"
        await cache.aclose()
    assert cache.fetches == 2
    assert requests.count(input_narinfo) == 1  # the prefetch's, shared with the get


async def test_concurrent_gets_fetch_once() -> None:
    transport, requests = _serve_two()
    async with httpx.AsyncClient(transport=transport) as http:
        cache = DrvCache(http)
        a, b = await asyncio.gather(
            cache.get("http://runner/cache", DRV_PATH), cache.get("http://runner/cache", DRV_PATH)
        )
        assert a is b
        await cache.aclose()
    assert cache.fetches == 1 and len(requests) == 2


async def test_a_failed_prefetch_fails_the_get_that_needs_it() -> None:
    transport, _ = _serve_two()
    original = transport.handle_async_request

    async def dep_missing(request: httpx.Request) -> httpx.Response:
        if StorePath.parse(DRV_PATH).hash_part in request.url.path:
            return httpx.Response(404)
        return await original(request)

    transport.handle_async_request = dep_missing  # type: ignore[method-assign]
    async with httpx.AsyncClient(transport=transport) as http:
        cache = DrvCache(http)
        await cache.get("http://runner/cache", TOP_PATH)
        with pytest.raises(DrvFetchError, match="not in the cache"):
            await cache.get("http://runner/cache", DRV_PATH)
        await cache.aclose()
    assert len(cache) == 1
