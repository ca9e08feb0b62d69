"""Other binary caches asked for narinfo before building (``Upstreams``), and the closure of
paths through the cache and the upstreams (``closure``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence

import httpx

from bigtent.config import Upstream
from bigtent.errors import ConfigError, UpstreamUnavailable, describe
from bigtent.nix import narinfo
from bigtent.nix.keys import parse_public_key
from bigtent.nix.store_path import StorePath
from bigtent.runner.cache.lru import Lru
from bigtent.runner.cache.service import Cache

log = logging.getLogger(__name__)

MEMORY_UPSTREAM_NARINFOS = 100_000
"""Upstream narinfo records (paths an upstream has) kept in memory."""


class Upstreams:
    """Other binary caches (e.g. the public NixOS cache) asked for narinfo before building.

    Lookups run concurrently with a bounded number in flight and time out. A narinfo counts
    only when it is signed by that upstream's configured key. Paths found are remembered (a
    path an upstream has does not disappear); absences are not. An upstream that does not
    answer is an error (``UpstreamUnavailable``), never "absent": treating it as absent would
    rebuild everything it holds.
    """

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        max_in_flight: int,
        timeout_secs: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.upstreams = list(upstreams)
        self._keys = []
        for i, up in enumerate(self.upstreams):
            try:
                self._keys.append(parse_public_key(up.public_key))
            except ValueError as exc:
                raise ConfigError(f"config key cache.upstreams[{i}].public_key: {exc}") from exc
        self._sem = asyncio.Semaphore(max_in_flight)
        self._client = httpx.AsyncClient(timeout=timeout_secs, transport=transport)
        self._known: Lru[narinfo.NarInfo] = Lru(MEMORY_UPSTREAM_NARINFOS)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def lookup(self, path: str) -> narinfo.NarInfo | None:
        """The first upstream's signed narinfo for ``path``, or None when no upstream has it.

        Raises UpstreamUnavailable when an upstream cannot be asked (network error, 5xx).
        """
        remembered = self._known.get(path)
        if remembered is not None:
            return remembered
        hash_part = StorePath.parse(path).hash_part
        for up, key in zip(self.upstreams, self._keys, strict=True):
            url = f"{up.url.rstrip('/')}/{hash_part}.narinfo"
            try:
                async with self._sem:
                    resp = await self._client.get(url)
            except httpx.HTTPError as exc:
                raise UpstreamUnavailable(
                    f"upstream cache {up.url} did not answer: {describe(exc)}"
                ) from exc
            if resp.status_code in (403, 404):  # absent (S3-backed caches answer 403)
                continue
            if resp.status_code != 200:
                raise UpstreamUnavailable(
                    f"upstream cache {up.url} answered HTTP {resp.status_code} for {url}"
                )
            try:
                info = narinfo.parse(resp.text)
            except ValueError as exc:
                log.warning("upstream %s sent a bad narinfo for %s: %s", up.url, path, exc)
                continue
            if info.store_path != path:
                continue
            fingerprint = info.fingerprint()
            if not any(key.verify(fingerprint, sig) for sig in info.sigs):
                log.warning("upstream %s: %s is not signed by %s", up.url, path, key.name)
                continue
            self._known.put(path, info)
            return info
        return None

    async def have_all(self, paths: Sequence[str]) -> bool:
        """Whether upstreams hold every one of ``paths``."""
        if not self.upstreams or not paths:
            return False
        results = await asyncio.gather(*(self.lookup(p) for p in paths))
        return all(r is not None for r in results)


async def closure(
    cache: Cache, upstreams: Upstreams, roots: Iterable[str], *, also: Cache | None = None
) -> set[str]:
    """All paths reachable by references from ``roots`` through the cache (then ``also``, the
    untrusted cache for an untrusted step's inputs) and upstreams."""
    seen: set[str] = set()
    frontier = [r for r in set(roots)]
    while frontier:
        seen.update(frontier)
        known = await cache.references_of(frontier)
        if also is not None:
            known.update(await also.references_of([p for p in frontier if p not in known]))
        nxt: set[str] = set()
        missing = [p for p in frontier if p not in known]
        for refs in known.values():
            nxt.update(refs)
        if missing:  # most often none: every input is in the cache
            infos = await asyncio.gather(*(upstreams.lookup(p) for p in missing))
            for info in infos:
                if info is not None:
                    nxt.update(f"/nix/store/{r}" for r in info.references)
        frontier = [p for p in nxt if p not in seen]
    return seen
