"""The retention policy (pure): what a collection deletes, and why."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bigtent.runner.retention.policy import (
    CachedPath,
    Policy,
    Reason,
    RootKind,
    closure,
    decide,
    eviction_order,
)

NOW = 1_000_000.0
DAY = 86400.0


def cache(spec: Mapping[str, tuple[int, list[str], float]]) -> dict[str, CachedPath]:
    """name -> (size, references, days since last use); each path its own file."""
    return {
        name: CachedPath(f"nar/{name}", size, tuple(refs), NOW - days * DAY)
        for name, (size, refs, days) in spec.items()
    }


# A small cache: app -> lib -> libc; tool -> libc; old -> oldlib; shared file for twin/twin2.
PATHS = cache(
    {
        "app": (10, ["lib"], 1),
        "lib": (20, ["libc"], 40),
        "libc": (30, [], 40),
        "tool": (5, ["libc"], 50),
        "old": (7, ["oldlib"], 60),
        "oldlib": (8, [], 60),
    }
)


@pytest.mark.parametrize(
    ("roots", "policy", "deleted"),
    [
        # Nothing idle: everything stays.
        ({}, Policy(max_idle_secs=100 * DAY), {}),
        # Idle limit 30 days: app is recent and keeps its closure; tool, old, oldlib go.
        (
            {},
            Policy(max_idle_secs=30 * DAY),
            {"tool": Reason.IDLE, "old": Reason.IDLE, "oldlib": Reason.IDLE},
        ),
        # A pin keeps old's closure.
        ({"old": RootKind.PIN}, Policy(max_idle_secs=30 * DAY), {"tool": Reason.IDLE}),
        # A root not in the cache changes nothing.
        (
            {"missing": RootKind.PIN},
            Policy(max_idle_secs=30 * DAY),
            {"tool": Reason.IDLE, "old": Reason.IDLE, "oldlib": Reason.IDLE},
        ),
        # Quota 60 bytes, no idle limit: least recently used first (old+oldlib at 60 days,
        # then tool at 50): 80 -> 65 -> 60.
        (
            {},
            Policy(quota_high=60),
            {"old": Reason.QUOTA, "oldlib": Reason.QUOTA, "tool": Reason.QUOTA},
        ),
        # High 75, low 70: evicting old (7) and oldlib (8) reaches 65.
        ({}, Policy(quota_high=75, quota_low=70), {"old": Reason.QUOTA, "oldlib": Reason.QUOTA}),
        # Under the high watermark: nothing evicted even above the low one.
        ({}, Policy(quota_high=80, quota_low=10), {}),
        # lib was used 40 days ago but app (1 day) references it: its effective use is app's,
        # so the quota evicts tool (50 days) first, then app (80 -> 75 -> 65), never lib
        # while app stays.
        (
            {"old": RootKind.PIN},
            Policy(quota_high=70),
            {"tool": Reason.QUOTA, "app": Reason.QUOTA},
        ),
        # The quota cannot touch rooted paths: over quota, with the recent ones all evicted.
        (
            {"app": RootKind.BUILD, "old": RootKind.PIN},
            Policy(quota_high=10),
            {"tool": Reason.QUOTA},
        ),
    ],
)
def test_decisions(roots: dict[str, str], policy: Policy, deleted: dict[str, Reason]) -> None:
    policy = Policy(
        max_idle_secs=policy.max_idle_secs,
        quota_high=policy.quota_high,
        quota_low=policy.quota_low,
        grace_secs=0,
    )
    decision = decide(PATHS, roots, policy, NOW)
    assert decision.delete == deleted


def test_rooted_paths_over_quota_are_reported() -> None:
    decision = decide(PATHS, {"app": RootKind.BUILD}, Policy(quota_high=10, grace_secs=0), NOW)
    assert decision.over_quota
    assert decision.bytes_after == 10 + 20 + 30  # app's closure stays


def test_grace_period_keeps_fresh_paths_and_their_closures() -> None:
    paths = cache({"new": (1, ["dep"], 0.001), "dep": (1, [], 90)})
    decision = decide(paths, {}, Policy(max_idle_secs=DAY, grace_secs=3600), NOW)
    assert decision.delete == {}
    assert decision.roots == {"grace": 1}


def test_shared_files_count_once_and_free_only_when_all_users_go() -> None:
    paths = {
        "a": CachedPath("nar/same", 100, (), NOW - 50 * DAY),
        "b": CachedPath("nar/same", 100, (), NOW - 10 * DAY),
        "c": CachedPath("nar/c", 50, (), NOW - 40 * DAY),
    }
    decision = decide(paths, {}, Policy(quota_high=120, grace_secs=0), NOW)
    assert decision.bytes_before == 150
    # a goes first (oldest) but frees nothing while b keeps the file; then c (50 bytes).
    assert decision.delete == {"a": Reason.QUOTA, "c": Reason.QUOTA}
    assert decision.bytes_after == 100


def test_idle_victims_come_referrers_first() -> None:
    paths = cache({"top": (1, ["mid"], 90), "mid": (1, ["leaf"], 90), "leaf": (1, [], 90)})
    decision = decide(paths, {}, Policy(max_idle_secs=DAY, grace_secs=0), NOW)
    assert list(decision.delete) == ["top", "mid", "leaf"]


def test_eviction_order_leaves_cycles_alone() -> None:
    paths = cache({"x": (1, ["y"], 9), "y": (1, ["x"], 9), "z": (1, ["z"], 9)})
    assert eviction_order(paths, set(paths)) == ["z"]


def test_counts_by_reason() -> None:
    decision = decide(PATHS, {}, Policy(max_idle_secs=30 * DAY, grace_secs=0), NOW)
    assert decision.counts() == {"idle": 3, "quota": 0}
    assert decision.bytes_freed == 5 + 7 + 8


# ---- properties ----------------------------------------------------------------------------
@st.composite
def caches(draw: st.DrawFn) -> dict[str, CachedPath]:
    """A DAG of up to 30 paths (references only to lower-numbered paths, as store paths
    are made), some sharing files."""
    n = draw(st.integers(min_value=0, max_value=30))
    out: dict[str, CachedPath] = {}
    for i in range(n):
        refs = draw(st.lists(st.integers(min_value=0, max_value=max(0, i - 1)), max_size=4))
        file_no = draw(st.integers(min_value=0, max_value=i + 5))
        out[f"p{i}"] = CachedPath(
            f"nar/f{file_no}",
            # One size per file: a shared file has one size.
            (file_no * 37) % 100 + 1,
            tuple(f"p{r}" for r in refs if i > 0),
            NOW - draw(st.floats(min_value=0, max_value=100)) * DAY,
        )
    return out


@st.composite
def cases(draw: st.DrawFn) -> tuple[dict[str, CachedPath], dict[str, str], Policy]:
    paths = draw(caches())
    roots: dict[str, str] = (
        {p: RootKind.PIN for p in draw(st.lists(st.sampled_from(sorted(paths)), max_size=3))}
        if paths
        else {}
    )
    high = draw(st.none() | st.integers(min_value=1, max_value=2000))
    low = None if high is None else draw(st.none() | st.integers(min_value=0, max_value=high))
    idle = draw(st.none() | st.floats(min_value=1, max_value=90))
    policy = Policy(
        max_idle_secs=None if idle is None else idle * DAY,
        quota_high=high,
        quota_low=low,
        grace_secs=draw(st.sampled_from([0.0, 3600.0, 5 * DAY])),
    )
    return paths, roots, policy


@settings(max_examples=300, deadline=None)
@given(cases())
def test_no_kept_path_references_a_deleted_one(
    case: tuple[dict[str, CachedPath], dict[str, str], Policy],
) -> None:
    paths, roots, policy = case
    decision = decide(paths, roots, policy, NOW)
    kept = set(paths) - set(decision.delete)
    for p in kept:
        assert not set(paths[p].references) & set(decision.delete), p
    # Roots, and what they reference, are never deleted.
    assert not closure(paths, roots) & set(decision.delete)
    # Nor what was used within the grace period.
    assert not {p for p, i in paths.items() if i.last_used >= NOW - policy.grace_secs} & set(
        decision.delete
    )


@settings(max_examples=300, deadline=None)
@given(cases())
def test_the_quota_is_met_when_enough_is_unrooted(
    case: tuple[dict[str, CachedPath], dict[str, str], Policy],
) -> None:
    paths, roots, policy = case
    decision = decide(paths, roots, policy, NOW)
    kept = set(paths) - set(decision.delete)
    kept_bytes = sum({paths[p].file: paths[p].size for p in kept}.values())
    assert kept_bytes == decision.bytes_after
    if policy.quota_high is None:
        return
    grace = {p for p, i in paths.items() if i.last_used >= NOW - policy.grace_secs}
    hard = closure(paths, set(roots) | grace)
    hard_bytes = sum({paths[p].file: paths[p].size for p in hard}.values())
    low = policy.quota_low if policy.quota_low is not None else policy.quota_high
    if hard_bytes <= low:
        assert kept_bytes <= policy.quota_high
    assert decision.over_quota == (
        hard_bytes > policy.quota_high and kept_bytes > policy.quota_high
    )


@settings(max_examples=300, deadline=None)
@given(cases())
def test_eviction_takes_least_recently_used_first(
    case: tuple[dict[str, CachedPath], dict[str, str], Policy],
) -> None:
    paths, roots, policy = case
    decision = decide(paths, roots, policy, NOW)
    evicted = {p for p, r in decision.delete.items() if r is Reason.QUOTA}
    if not evicted:
        return
    grace = {p for p, i in paths.items() if i.last_used >= NOW - policy.grace_secs}
    hard = closure(paths, set(roots) | grace)
    recent = {p for p in paths if p not in hard and decision.delete.get(p) is not Reason.IDLE}

    def effective(p: str) -> float:
        """The latest use of p and of every recent path that reaches it by references."""
        return max(paths[q].last_used for q in recent if p in closure(paths, [q]))

    newest_evicted = max(effective(p) for p in evicted)
    for p in recent - evicted:
        assert effective(p) >= newest_evicted, p
