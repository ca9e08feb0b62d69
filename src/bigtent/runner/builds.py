"""Turning requested .drv paths into the steps a build needs (DESIGN §1 step 2).

A derivation needs a step when some output is neither in the runner's cache nor in an
upstream cache; only then are its inputs looked at, so a build on top of a public cache never
walks into what that cache already holds. An untrusted build also reuses what the untrusted
cache holds; a trusted build never does (docs/security.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from bigtent.errors import BadRequest, NotFound
from bigtent.nix.store_path import StorePath
from bigtent.runner.cache import Cache, Upstreams
from bigtent.runner.db import queries
from bigtent.runner.scheduler.dispatcher import PlannedStep

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BuildPlan:
    roots: dict[str, str | None]
    """Root .drv -> itself when it needs a step, None when its outputs are available."""
    planned: list[PlannedStep]
    """Steps to create, dependencies before dependents."""


async def plan_build(
    cache: Cache, upstreams: Upstreams, drv_paths: Sequence[str], *, also: Cache | None = None
) -> BuildPlan:
    """Find every derivation below ``drv_paths`` whose outputs must be built: outputs in
    ``cache``, in ``also`` (the untrusted cache, for an untrusted build) or upstream count as
    available."""
    if not drv_paths:
        raise BadRequest("a build needs at least one .drv path")
    for d in drv_paths:
        try:
            sp = StorePath.parse(d)
        except ValueError as exc:
            raise BadRequest(f"not a store path: {d!r}") from exc
        if not sp.name.endswith(".drv"):
            raise BadRequest(f"not a derivation: {d}")
    infos: dict[str, queries.DrvInfo] = {}
    needed: set[str] = set()
    frontier = list(dict.fromkeys(drv_paths))
    while frontier:
        found = await cache.derivations(frontier)
        unknown = [d for d in frontier if d not in found]
        if unknown:
            raise NotFound(
                f"unknown derivation {unknown[0]}: upload the closure first "
                f"({len(unknown)} missing)"
            )
        infos.update(found)
        outputs = [o for d in frontier for o in found[d].outputs.values()]
        present = await cache.present(outputs)
        if also is not None:
            present |= await also.present([o for o in outputs if o not in present])
        level_missing = [d for d in frontier if not set(found[d].outputs.values()) <= present]
        upstream = await asyncio.gather(
            *(upstreams.have_all(list(found[d].outputs.values())) for d in level_missing)
        )
        nxt: set[str] = set()
        for d, available in zip(level_missing, upstream, strict=True):
            if available:
                continue
            needed.add(d)
            nxt.update(i for i in found[d].input_drvs if i not in infos)
        frontier = sorted(nxt)
    planned = [
        PlannedStep(infos[d], tuple(sorted(i for i in infos[d].input_drvs if i in needed)))
        for d in _dependencies_first(needed, infos)
    ]
    roots = {d: (d if d in needed else None) for d in drv_paths}
    log.debug("planned %d steps for %d roots", len(planned), len(roots))
    return BuildPlan(roots, planned)


def _dependencies_first(needed: set[str], infos: dict[str, queries.DrvInfo]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()
    for start in sorted(needed):
        if start in seen:
            continue
        stack: list[tuple[str, bool]] = [(start, False)]
        while stack:
            drv, expanded = stack.pop()
            if expanded:
                order.append(drv)
                continue
            if drv in seen:
                continue
            seen.add(drv)
            stack.append((drv, True))
            stack.extend(
                (i, False) for i in sorted(infos[drv].input_drvs) if i in needed and i not in seen
            )
    return order
