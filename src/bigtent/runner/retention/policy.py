"""What a collection deletes from a cache, and why (pure; docs/cache.md).

Inputs: every cached path with its NAR file, the file's size, its references and when it was
last used (or published); the roots; the policy (idle limit, quota watermarks, grace period)
and the time. Output: the paths to delete, each with its reason, and the counts shown by
``bigtent gc`` and the metrics.

The rules:

- *Hard roots* are never deleted, nor anything they reference (closure): pinned paths, the
  outputs of the latest builds per repository/ref, what active steps need, whatever another
  cache's kept paths reference, and every path used or published within the grace period.
- *Recent* paths (used within ``max_idle_secs``) and their closures are kept too, unless the
  quota needs room: then they are evicted least recently used first. A path's use counts as
  the latest use of itself and of every recent path that references it, and a path goes only
  after every recent path referencing it went, so no kept path ever references a deleted one.
- Everything else is *idle*: deleted.

Sizes count NAR files, not paths: two paths sharing one file (the same NAR) count it once, and
deleting one of them frees nothing while the other stays.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class RootKind(StrEnum):
    """Why a path is a hard root (``bigtent gc --json`` ``roots``)."""

    PIN = "pin"
    BUILD = "build"
    """An output of one of the latest builds of its repository/ref."""
    ACTIVE = "active"
    """Needed by a step that has not finished (its .drv, its inputs)."""
    REFERENCED = "referenced"
    """Referenced by a path the other cache keeps (untrusted outputs of main-cache inputs)."""


class Reason(StrEnum):
    """Why a path is deleted."""

    IDLE = "idle"
    """Not used within ``max_idle_days``, and nothing kept references it."""
    QUOTA = "quota"
    """Evicted, least recently used first, to bring the cache under its quota."""


@dataclass(frozen=True, slots=True)
class CachedPath:
    file: str
    """The NAR file (narinfo ``URL``): several paths may share one."""
    size: int
    """The file's size in bytes."""
    references: tuple[str, ...]
    """Paths it references (keys of the same mapping; others are ignored)."""
    last_used: float
    """The latest of when it was published and when it was last asked for."""


@dataclass(frozen=True, slots=True)
class Policy:
    max_idle_secs: float | None = None
    """None: paths are never deleted for being idle (only the quota evicts)."""
    quota_high: int | None = None
    """Bytes; above it a collection evicts recent unrooted paths. None: no quota."""
    quota_low: int | None = None
    """Bytes the eviction brings the cache down to (default: ``quota_high``)."""
    grace_secs: float = 3600.0
    """Paths used or published this recently are hard roots."""


@dataclass(slots=True)
class Decision:
    delete: dict[str, Reason] = field(default_factory=dict)
    """Paths to delete, each with its reason, in the order to delete them (referrers first)."""
    roots: Counter[str] = field(default_factory=Counter)
    """Hard roots present in the cache, by kind (``RootKind`` or ``grace``)."""
    kept_hard: int = 0
    """Paths kept by hard roots (closures included)."""
    kept_recent: int = 0
    """Paths kept for being used recently (closures included) and not evicted."""
    paths: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    over_quota: bool = False
    """True when the hard roots alone exceed the quota's high watermark."""

    @property
    def bytes_freed(self) -> int:
        return self.bytes_before - self.bytes_after

    def counts(self) -> dict[str, int]:
        """Deleted paths per reason."""
        out = {str(r): 0 for r in Reason}
        for reason in self.delete.values():
            out[str(reason)] += 1
        return out


def closure(paths: Mapping[str, CachedPath], roots: Iterable[str]) -> set[str]:
    """``roots`` present in ``paths`` and everything they reference, transitively."""
    seen = {r for r in roots if r in paths}
    stack = list(seen)
    while stack:
        for ref in paths[stack.pop()].references:
            if ref in paths and ref not in seen:
                seen.add(ref)
                stack.append(ref)
    return seen


def _file_bytes(paths: Mapping[str, CachedPath], kept: Iterable[str]) -> tuple[int, Counter[str]]:
    users: Counter[str] = Counter()
    total = 0
    for p in kept:
        info = paths[p]
        if users[info.file] == 0:
            total += info.size
        users[info.file] += 1
    return total, users


def eviction_order(paths: Mapping[str, CachedPath], candidates: set[str]) -> list[str]:
    """``candidates`` in the order the quota evicts them: by the latest use of the path or of
    any candidate referencing it, oldest first, and every path after all candidates that
    reference it. Paths on a reference cycle (never made by Nix, except self-references) are
    left out: never evicted."""
    referrers: dict[str, list[str]] = {p: [] for p in candidates}
    for p in candidates:
        for ref in set(paths[p].references):
            if ref in candidates and ref != p:
                referrers[ref].append(p)
    # ``blockers[p]``: candidates referencing p not yet placed.
    blockers = {p: len(referrers[p]) for p in candidates}
    effective = {p: paths[p].last_used for p in candidates}
    ready = [p for p in candidates if blockers[p] == 0]
    order: list[str] = []
    # Kahn's order over "referrer before reference": a path's effective use is final once
    # every referrer is placed. The heap then yields the oldest effective use first.
    heap: list[tuple[float, str]] = [(effective[p], p) for p in ready]
    heapq.heapify(heap)
    while heap:
        _, p = heapq.heappop(heap)
        order.append(p)
        for ref in set(paths[p].references):
            if ref in candidates and ref != p:
                effective[ref] = max(effective[ref], effective[p])
                blockers[ref] -= 1
                if blockers[ref] == 0:
                    heapq.heappush(heap, (effective[ref], ref))
    return order


def decide(
    paths: Mapping[str, CachedPath], roots: Mapping[str, str], policy: Policy, now: float
) -> Decision:
    """What to delete from a cache of ``paths`` whose hard roots are ``roots`` (path -> kind;
    roots not in the cache are ignored)."""
    decision = Decision(paths=len(paths))
    hard_roots = {r: k for r, k in roots.items() if r in paths}
    grace_from = now - policy.grace_secs
    for p, info in paths.items():
        if info.last_used >= grace_from and p not in hard_roots:
            hard_roots[p] = "grace"
    decision.roots = Counter(hard_roots.values())
    hard = closure(paths, hard_roots)
    if policy.max_idle_secs is None:
        recent = set(paths) - hard
    else:
        idle_from = now - policy.max_idle_secs
        recent = closure(paths, (p for p, i in paths.items() if i.last_used >= idle_from)) - hard
    for p in paths:
        if p not in hard and p not in recent:
            decision.delete[p] = Reason.IDLE
    decision.bytes_before, _ = _file_bytes(paths, paths)
    total, users = _file_bytes(paths, hard | recent)
    high = policy.quota_high
    if high is not None and total > high:
        low = policy.quota_low if policy.quota_low is not None else high
        order = eviction_order(paths, recent)
        evicted: list[str] = []
        for p in order:
            if total <= low:
                break
            evicted.append(p)
            info = paths[p]
            users[info.file] -= 1
            if users[info.file] == 0:
                total -= info.size
        for p in evicted:
            decision.delete[p] = Reason.QUOTA
        recent -= set(evicted)
        hard_bytes, _ = _file_bytes(paths, hard)
        decision.over_quota = hard_bytes > high
    # Idle paths first (nothing kept references them), then evictions in their order; within
    # the idle ones, referrers before what they reference, so a sweep cut short never leaves
    # a path whose references are gone.
    idle = [p for p, r in decision.delete.items() if r is Reason.IDLE]
    idle_order = eviction_order(paths, set(idle))
    placed = set(idle_order)
    left = [p for p in idle if p not in placed]
    ordered = {p: Reason.IDLE for p in idle_order + left}
    ordered.update((p, r) for p, r in decision.delete.items() if r is Reason.QUOTA)
    decision.delete = ordered
    decision.kept_hard = len(hard)
    decision.kept_recent = len(recent)
    decision.bytes_after = total
    return decision
