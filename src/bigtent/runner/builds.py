"""Turning requested .drv paths into the steps a build needs (architecture §1 step 2).

A derivation needs a step when some output is neither in the runner's cache nor in an
upstream cache; only then are its inputs looked at, so a build on top of a public cache never
walks into what that cache already holds.

The walk goes down from the requested derivations, depth first, a batch at a time. A needed
derivation none of whose inputs is needed (a *leaf*) can be built at once; leaves are handed
over as soon as all their inputs have been looked at, so the scheduler starts building while
the rest of a large graph is still being planned (``plan_parts``). Everything else follows in
one last part, dependencies first. An untrusted build also reuses what the
untrusted cache holds; a trusted build never does (docs/security.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from bigtent.errors import BadRequest, NotFound
from bigtent.graphs import dependencies_first
from bigtent.nix.store_path import StorePath
from bigtent.runner.cache.service import Cache
from bigtent.runner.cache.upstreams import Upstreams
from bigtent.runner.db import queries
from bigtent.runner.scheduler.model import PlannedStep, PlanPart
from bigtent.runner.scheduler.steps import plan_heights

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
    """Find every derivation below ``drv_paths`` whose outputs must be built (all at once)."""
    planned: list[PlannedStep] = []
    roots: dict[str, str | None] = {}
    async for part in plan_parts(cache, upstreams, drv_paths, also=also):
        planned.extend(part.steps)
        roots = part.roots if part.roots is not None else roots
    return BuildPlan(roots, planned)


WALK_BATCH = 1000
"""Derivations looked at together (one database round per table)."""
PART_FIRST = 1
PART_MAX = 8000
"""Leaves are handed over once this many are found, doubling from the first to the largest:
the first as soon as there is one, so building starts at once."""


async def plan_parts(
    cache: Cache, upstreams: Upstreams, drv_paths: Sequence[str], *, also: Cache | None = None
) -> AsyncIterator[PlanPart]:
    """The steps below ``drv_paths`` in parts: leaves as they are found, then the rest
    (dependencies first, with the roots). Each part's steps depend only on steps of earlier
    parts or earlier in the same part. Raises BadRequest or NotFound (unknown derivation)
    before the first part when a requested path is bad, later when a deeper one is unknown.

    The walk is depth first, a batch of derivations at a time, so the first leaves are found
    after a few batches whatever the size of the graph. A needed derivation is a leaf once
    every one of its inputs has been looked at and none is needed. Outputs in ``cache``, in
    ``also`` (the untrusted cache, for an untrusted build) or upstream count as available.
    """
    if not drv_paths:
        raise BadRequest("a build needs at least one .drv path")
    for d in drv_paths:
        try:
            sp = StorePath.parse(d)
        except ValueError as exc:
            raise BadRequest(f"not a store path: {d!r}") from exc
        if not sp.name.endswith(".drv"):
            raise BadRequest(f"not a derivation: {d}")
    roots = list(dict.fromkeys(drv_paths))
    infos: dict[str, queries.DrvInfo] = {}
    needed: dict[str, bool] = {}
    """Derivations looked at: whether each needs a step."""
    depth = dict.fromkeys(roots, 1)
    unresolved: dict[str, int] = {}
    """Needed derivation -> how many of its inputs have not been looked at yet."""
    waiting: dict[str, list[str]] = {}
    """Derivation not looked at yet -> needed derivations waiting for it."""
    above_needed: set[str] = set()
    """Needed derivations with a needed input (not leaves)."""
    leaves: list[str] = []
    emitted: set[str] = set()
    threshold = PART_FIRST
    stack = list(reversed(roots))
    queued = set(roots)

    def resolved(parent: str) -> None:
        unresolved[parent] -= 1
        if not unresolved[parent] and parent not in above_needed:
            leaves.append(parent)

    while stack:
        batch = [stack.pop() for _ in range(min(WALK_BATCH, len(stack)))]
        found = await cache.derivations(batch)
        unknown = [d for d in batch if d not in found]
        if unknown:
            raise NotFound(
                f"unknown derivation {unknown[0]}: upload the closure first "
                f"({len(unknown)} missing)"
            )
        infos.update(found)
        outputs = [o for d in batch for o in found[d].outputs.values()]
        present = await cache.present(outputs)
        if also is not None:
            present |= await also.present([o for o in outputs if o not in present])
        missing = [d for d in batch if not set(found[d].outputs.values()) <= present]
        if upstreams.upstreams:
            available = await asyncio.gather(
                *(upstreams.have_all(list(found[d].outputs.values())) for d in missing)
            )
        else:
            available = [False] * len(missing)
        needs = {d for d, a in zip(missing, available, strict=True) if not a}
        for d in batch:
            needed[d] = d in needs
            if d in needs:
                unresolved[d] = 1  # for the resolved() call below
                for i in sorted(found[d].input_drvs):
                    if i in needed:
                        if needed[i]:
                            above_needed.add(d)
                        continue
                    unresolved[d] += 1
                    waiting.setdefault(i, []).append(d)
                    if i not in queued:
                        queued.add(i)
                        depth[i] = depth[d] + 1
                        stack.append(i)
                resolved(d)
            for parent in waiting.pop(d, ()):
                if d in needs:
                    above_needed.add(parent)
                resolved(parent)
        if len(leaves) >= threshold:
            yield PlanPart(
                [PlannedStep(infos[d], ()) for d in leaves], {d: depth[d] for d in leaves}
            )
            emitted.update(leaves)
            leaves = []
            threshold = min(2 * threshold, PART_MAX)
    rest = {d for d, n in needed.items() if n} - emitted
    planned = [
        PlannedStep(infos[d], tuple(sorted(i for i in infos[d].input_drvs if needed.get(i))))
        for d in dependencies_first({d: infos[d].input_drvs for d in rest})
    ]
    log.debug("planned %d steps for %d roots", len(planned) + len(emitted), len(roots))
    yield PlanPart(
        planned,
        plan_heights([(s.drv.drv_path, s.deps) for s in planned]),
        {d: (d if needed[d] else None) for d in drv_paths},
    )
