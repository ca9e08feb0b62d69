"""``/cache``: the binary cache Nix reads (nix-cache-info, narinfo, NAR files), and the
untrusted cache under ``/cache/untrusted``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response

from bigtent.errors import NotFound
from bigtent.runner.cache.s3 import S3Storage, s3_nar_response
from bigtent.runner.cache.service import Cache
from bigtent.runner.cache.storage import MAX_NAME_BYTES
from bigtent.runner.components import Components
from bigtent.runner.http.deps import Comps
from bigtent.runner.http.hotpath import HotTable

SMALL_NAR_BYTES = 256 * 1024


cache_routes = APIRouter(prefix="/cache", include_in_schema=False)


def _untrusted(comps: Components) -> Cache:
    if comps.untrusted_cache is None:
        raise NotFound("no untrusted cache")
    return comps.untrusted_cache


def _cache_info(comps: Components, cache: Cache) -> Response:
    # The untrusted cache is consulted after the main one (a higher Priority number).
    priority = comps.config.cache.priority + (10 if cache.untrusted else 0)
    text = f"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: {priority}\n"
    return PlainTextResponse(text, media_type="text/x-nix-cache-info")


async def _narinfo(cache: Cache, hash_part: str) -> Response:
    text = await cache.narinfo_text(hash_part) if len(hash_part) == 32 else None
    cache.metrics.narinfo_served(hit=text is not None)
    if text is None:
        raise NotFound("no such path")
    return PlainTextResponse(text, media_type="text/x-nix-narinfo")


async def _nar(cache: Cache, file_name: str, request: Request) -> Response:
    storage = cache.storage
    if len(file_name.encode()) > MAX_NAME_BYTES:
        raise NotFound("no such NAR")  # no file has such a name, in a directory or a bucket
    cache.nar_requested(f"nar/{file_name}")
    if isinstance(storage, S3Storage):
        return await s3_nar_response(storage, f"nar/{file_name}", head=request.method == "HEAD")
    path = storage.local_path(f"nar/{file_name}")
    if path is None:
        raise NotFound("no such NAR")
    stat = path.stat()
    response = FileResponse(path, stat_result=stat, media_type="application/x-nix-nar")
    if _whole_at_once(request, stat.st_size):
        return _read_whole(response, path, stat.st_size) or response
    # HEAD, a range, a large file: FileResponse, which hands the file to the kernel where the
    # connection offers pathsend (plain TCP: runner/http/pathsend.py) and streams it elsewhere.
    return response


def _whole_at_once(request: Request, size: int) -> bool:
    """True for a ``GET`` of a whole NAR of at most ``SMALL_NAR_BYTES``, whatever the
    connection: most NARs are small (an agent's inputs are a few hundred bytes), and one read
    sent with the response's start costs less than a sendfile or FileResponse's thread hop per
    chunk."""
    return size <= SMALL_NAR_BYTES and request.method == "GET" and "range" not in request.headers


def _read_whole(file: FileResponse, path: Path, size: int) -> Response | None:
    """``file`` as one response of the bytes read now, or None when the file is no longer
    ``size`` bytes (it changed since its stat: FileResponse then serves it as before)."""
    try:
        body = path.read_bytes()
    except OSError:
        return None  # gone since its stat: as FileResponse has always answered that
    if len(body) != size:
        return None
    whole = Response(body)
    whole.raw_headers = file.raw_headers
    return whole


@cache_routes.api_route("/nix-cache-info", methods=["GET", "HEAD"])
async def nix_cache_info(comps: Comps) -> Response:
    return _cache_info(comps, comps.cache)


@cache_routes.api_route("/{hash_part}.narinfo", methods=["GET", "HEAD"])
async def get_narinfo(hash_part: str, comps: Comps) -> Response:
    return await _narinfo(comps.cache, hash_part)


@cache_routes.api_route("/nar/{file_name}", methods=["GET", "HEAD"])
async def get_nar(file_name: str, comps: Comps, request: Request) -> Response:
    return await _nar(comps.cache, file_name, request)


# The untrusted cache (docs/security.md): outputs of untrusted builds, signed with its own key.
# Its narinfo index is its own; its NAR files share the storage (named by their own hash).
@cache_routes.api_route("/untrusted/nix-cache-info", methods=["GET", "HEAD"])
async def untrusted_cache_info(comps: Comps) -> Response:
    return _cache_info(comps, _untrusted(comps))


@cache_routes.api_route("/untrusted/{hash_part}.narinfo", methods=["GET", "HEAD"])
async def get_untrusted_narinfo(hash_part: str, comps: Comps) -> Response:
    return await _narinfo(_untrusted(comps), hash_part)


@cache_routes.api_route("/untrusted/nar/{file_name}", methods=["GET", "HEAD"])
async def get_untrusted_nar(file_name: str, comps: Comps, request: Request) -> Response:
    return await _nar(_untrusted(comps), file_name, request)


# The same endpoints for ``HotRoutes`` (runner/http/hotpath.py), which answers these requests
# without FastAPI's request path; the routes above stay for requests it leaves to FastAPI.
async def hot_narinfo(comps: Components, request: Request, params: dict[str, str]) -> Response:
    return await _narinfo(comps.cache, params["hash_part"])


async def hot_nar(comps: Components, request: Request, params: dict[str, str]) -> Response:
    return await _nar(comps.cache, params["file_name"], request)


async def hot_untrusted_narinfo(
    comps: Components, request: Request, params: dict[str, str]
) -> Response:
    return await _narinfo(_untrusted(comps), params["hash_part"])


async def hot_untrusted_nar(
    comps: Components, request: Request, params: dict[str, str]
) -> Response:
    return await _nar(_untrusted(comps), params["file_name"], request)


GET_HEAD = ("GET", "HEAD")

HOT_CACHE: HotTable = {
    # In the order of the routes above: /cache/untrusted.narinfo is a narinfo's path.
    "/cache/{hash_part}.narinfo": (GET_HEAD, hot_narinfo),
    "/cache/nar/{file_name}": (GET_HEAD, hot_nar),
    "/cache/untrusted/{hash_part}.narinfo": (GET_HEAD, hot_untrusted_narinfo),
    "/cache/untrusted/nar/{file_name}": (GET_HEAD, hot_untrusted_nar),
}
"""The hot cache routes (``nix-cache-info`` is asked once per store: not one of them)."""
