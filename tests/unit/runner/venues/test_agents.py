"""Which agent rows are pruned (architecture §4), as a decision table with an injected clock."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from bigtent.runner.venues.agents import MAX_PRUNE_INTERVAL_SECS, prune_interval_secs, stale_agents

NOW = 1_700_000_000.0
TTL = 3600.0


@dataclass(frozen=True)
class Row:
    machine_id: str
    ephemeral: bool
    last_seen: float
    connected: bool


@pytest.mark.parametrize(
    ("ephemeral", "connected", "age_secs", "pruned"),
    [
        # Stale ephemeral rows go whether or not they are marked connected: a killed runner
        # never marked its sessions disconnected.
        (True, False, TTL + 1, True),
        (True, True, TTL + 1, True),
        (True, True, 10 * TTL, True),
        # Exactly at the TTL, or fresher, they stay.
        (True, False, TTL, False),
        (True, True, TTL - 1, False),
        (True, False, 0.0, False),
        # Persistent rows are never pruned, however old.
        (False, False, TTL + 1, False),
        (False, True, 100 * TTL, False),
        # A row seen "in the future" (clock skew between runner restarts) stays.
        (True, False, -60.0, False),
    ],
)
def test_stale_agents_decision_table(
    ephemeral: bool, connected: bool, age_secs: float, pruned: bool
) -> None:
    row = Row("m1", ephemeral, NOW - age_secs, connected)
    assert stale_agents([row], NOW, TTL) == (["m1"] if pruned else [])


def test_stale_agents_over_many_rows_is_sorted() -> None:
    rows = [
        Row("c", True, NOW - 2 * TTL, True),
        Row("a", True, NOW - 2 * TTL, False),
        Row("b", False, NOW - 2 * TTL, False),
        Row("d", True, NOW, True),
    ]
    assert stale_agents(rows, NOW, TTL) == ["a", "c"]
    assert stale_agents([], NOW, TTL) == []


@pytest.mark.parametrize(
    ("ttl", "interval"),
    [(3600.0, MAX_PRUNE_INTERVAL_SECS), (400.0, 100.0), (1.0, 0.25), (1e9, 300.0)],
)
def test_prune_interval(ttl: float, interval: float) -> None:
    assert prune_interval_secs(ttl) == interval
