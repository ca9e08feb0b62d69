"""The agent's store budget: when to collect and how much (pure), its GC roots on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.storebudget import (
    StepRoots,
    StoreBudget,
    bytes_to_free,
    gc_roots_dir,
    parse_gc_summary,
)

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("free", "budget", "wanted"),
    [
        (0, StoreBudget(0, 0), 0),  # off
        (None, StoreBudget(10 * MIB, 20 * MIB), 0),  # free disk unknown
        (10 * MIB, StoreBudget(10 * MIB, 20 * MIB), 0),  # at the minimum: enough
        (9 * MIB, StoreBudget(10 * MIB, 20 * MIB), 11 * MIB),  # up to the target
        (9 * MIB, StoreBudget(10 * MIB, 0), 11 * MIB),  # target: twice the minimum
        (9 * MIB, StoreBudget(10 * MIB, 5 * MIB), 11 * MIB),  # a target below: twice
        (0, StoreBudget(1, 0), 2),
    ],
)
def test_bytes_to_free(free: int | None, budget: StoreBudget, wanted: int) -> None:
    assert bytes_to_free(free, budget) == wanted


@given(
    free=st.integers(min_value=0, max_value=2**50),
    minimum=st.integers(min_value=1, max_value=2**50),
    target=st.integers(min_value=0, max_value=2**50),
)
def test_a_collection_aims_at_least_at_the_minimum(free: int, minimum: int, target: int) -> None:
    budget = StoreBudget(minimum, target)
    wanted = bytes_to_free(free, budget)
    if free >= minimum:
        assert wanted == 0
    else:
        assert wanted > 0 and free + wanted >= minimum
        assert free + wanted == budget.target


def test_parse_gc_summary() -> None:
    out = "/nix/store/abc-x\n3 store paths deleted, 18.00 MiB freed\n"
    assert parse_gc_summary(out) == (3, 18 * MIB)
    assert parse_gc_summary("0 store paths deleted, 0.00 MiB freed\n") == (0, 0)
    assert parse_gc_summary("something else") is None


def test_gc_roots_dir_is_in_the_stores_gcroots_and_per_work_dir(tmp_path: Path) -> None:
    a = gc_roots_dir("local?root=/srv/store", tmp_path / "a")
    b = gc_roots_dir("local?root=/srv/store", tmp_path / "b")
    assert a.parent == b.parent == Path("/srv/store/nix/var/nix/gcroots")
    assert a != b and a.name.startswith("bigtent-agent-")
    assert gc_roots_dir("", tmp_path / "a").parent == Path("/nix/var/nix/gcroots")


def test_step_roots_link_each_path_for_the_life_of_the_step(tmp_path: Path) -> None:
    roots = StepRoots(tmp_path / "gcroots" / "bigtent-agent-x")
    (roots.directory).mkdir(parents=True)
    (roots.directory / "step-9-left-over").symlink_to("/nix/store/old")
    roots.reset()  # an earlier run's roots are gone
    assert list(roots.directory.iterdir()) == []
    a, b, c = (f"/nix/store/{h * 32}-{h}" for h in "abc")
    roots.add(1, [a, b])
    roots.add(1, [b])  # once
    roots.add(2, [b, c])  # two steps needing one path each hold it
    assert roots.held() == {a, b, c}
    assert len(list(roots.directory.iterdir())) == 4
    roots.remove(1)
    assert roots.held() == {b, c}
    assert {str(p.readlink()) for p in roots.directory.iterdir()} == {b, c}
    roots.remove(2)
    roots.remove(3)  # unknown: nothing
    assert list(roots.directory.iterdir()) == []
