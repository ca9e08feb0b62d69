"""A build's outputs into the local store: substituted from the runner's signed cache, and the
result links named as nix-build names them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bigtent.apimodels import Build, RunnerStatus
from bigtent.client.upload import first_leaf
from bigtent.errors import BigtentError, NixError
from bigtent.nix.store import NixStore, RealiseStatus


@dataclass(frozen=True, slots=True)
class ResultLink:
    link: str
    path: str


def result_links(out_link: str, outputs: Sequence[Mapping[str, str]]) -> list[ResultLink]:
    """nix-build's names: ``result``, ``result-2`` for the second derivation, and a ``-NAME``
    suffix for outputs other than ``out`` (``result-dev``, ``result-2-dev``).

    ``outputs`` holds one ``{output name: store path}`` per requested derivation, in order.
    """
    links: list[ResultLink] = []
    for index, outs in enumerate(outputs):
        prefix = out_link if index == 0 else f"{out_link}-{index + 1}"
        for name in sorted(outs, key=lambda n: (n != "out", n)):
            suffix = "" if name == "out" else f"-{name}"
            links.append(ResultLink(prefix + suffix, outs[name]))
    return links


def _sequential(out_link: str, links: Sequence[ResultLink]) -> bool:
    """Whether ``nix-store --realise P1 P2 … --add-root OUT`` names the roots as ``links``."""
    return all(
        link.link == (out_link if i == 0 else f"{out_link}-{i + 1}") for i, link in enumerate(links)
    ) and len({link.path for link in links}) == len(links)


def substituter_options(
    status: RunnerStatus, runner_url: str, *, untrusted: bool = False
) -> dict[str, str]:
    """Nix options to substitute from the runner's cache (and its upstreams), trusting their
    keys; the negative narinfo TTL is 0 because a lookup made before the build is stale now.

    Only for an ``untrusted`` build's outputs is the untrusted cache added (after the main
    one) and its key trusted: a client never trusts it for anything else."""

    def absolute(url: str) -> str:
        return runner_url.rstrip("/") + url if url.startswith("/") else url

    urls = [absolute(status.cache_url or "/cache")]
    keys = [status.cache_public_key]
    if untrusted:
        if not status.untrusted_cache_url or not status.untrusted_cache_public_key:
            raise BigtentError(
                "the build is untrusted but the runner names no untrusted cache to fetch its "
                "outputs from (an older runner?); use --no-download"
            )
        urls.append(absolute(status.untrusted_cache_url))
        keys.append(status.untrusted_cache_public_key)
    urls += [u.url for u in status.upstreams]
    keys += [u.public_key for u in status.upstreams]
    return {
        "substituters": " ".join(urls),
        "trusted-public-keys": " ".join(k for k in keys if k),
        "narinfo-cache-negative-ttl": "0",
    }


async def download_outputs(
    store: NixStore,
    status: RunnerStatus,
    build: Build,
    out_link: str | None,
    *,
    runner_url: str,
) -> list[ResultLink]:
    """Substitute the requested outputs into the local store and add ``result`` links."""
    options = substituter_options(status, runner_url, untrusted=not build.trusted)
    outputs = [root.outputs for root in build.roots]
    paths = list(dict.fromkeys(p for outs in outputs for p in outs.values()))
    if not paths:
        return []
    links = result_links(out_link, outputs) if out_link is not None else []
    links = [ResultLink(str(Path(link.link).absolute()), link.path) for link in links]
    if not links:
        await _realise(store, paths, options, None)
    elif _sequential(links[0].link, links):
        await _realise(store, [link.path for link in links], options, links[0].link)
    else:
        await _realise(store, paths, options, None)
        try:
            async with asyncio.TaskGroup() as tg:
                for link in links:
                    tg.create_task(_realise(store, [link.path], options, link.link))
        except BaseExceptionGroup as group:
            raise first_leaf(group) from None
    return links


async def _realise(
    store: NixStore, paths: Sequence[str], options: Mapping[str, str], add_root: str | None
) -> None:
    # nix-store replaces an existing link atomically, as nix-build does.
    result = await store.realise(paths, options=options, add_root=add_root)
    if result.status is not RealiseStatus.SUCCESS:
        raise NixError(
            f"fetching the outputs from the runner's cache failed: {result.error or result.status}"
        )
