from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.graphs import CycleError, dependencies_first


@pytest.mark.parametrize(
    ("deps", "expected"),
    [
        ({}, []),
        ({"a": []}, ["a"]),
        ({"b": [], "a": []}, ["a", "b"]),  # ties: in name order
        ({"a": ["b"], "b": []}, ["b", "a"]),
        ({"a": ["a"]}, ["a"]),  # a self-reference is no dependency
        ({"a": ["zzz"], "b": ["a"]}, ["a", "b"]),  # dependencies outside the keys are ignored
        ({"d": ["b", "c"], "c": ["a"], "b": ["a"], "a": []}, ["a", "b", "c", "d"]),
        ({"top": ["x", "x"], "x": []}, ["x", "top"]),  # a repeated dependency counts once
        ({3: [1, 2], 2: [], 1: [2]}, [2, 1, 3]),
        # depth first from each node in name order: "b" brings "c" before itself
        ({"a": [], "b": ["c"], "c": []}, ["a", "c", "b"]),
        ({"b": ["d", "c"], "a": ["d"], "c": [], "d": []}, ["d", "a", "c", "b"]),
    ],
)
def test_dependencies_first(deps: dict[str, list[str]], expected: list[str]) -> None:
    assert dependencies_first(deps) == expected


@pytest.mark.parametrize(
    ("deps", "stuck"),
    [
        ({"a": ["b"], "b": ["a"]}, ["a", "b"]),
        ({"a": ["b"], "b": ["c"], "c": ["a"], "d": []}, ["a", "b", "c"]),
        ({"a": ["b"], "b": ["a"], "top": ["a"], "leaf": []}, ["a", "b"]),
        ({"top": ["x"], "x": ["y"], "y": ["x"]}, ["x", "y"]),  # top leads to it, is not on it
    ],
)
def test_a_cycle_names_its_nodes(deps: dict[str, list[str]], stuck: list[str]) -> None:
    with pytest.raises(CycleError) as info:
        dependencies_first(deps)
    assert info.value.nodes == stuck


@st.composite
def dags(draw: st.DrawFn) -> dict[str, list[str]]:
    """Random acyclic graphs: a node depends only on nodes earlier in a hidden order."""
    names = draw(st.lists(st.text("abcdef", min_size=1, max_size=3), unique=True, max_size=30))
    return {
        name: draw(st.lists(st.sampled_from(names[:i]), max_size=5)) if i else []
        for i, name in enumerate(names)
    }


@given(dags(), st.randoms())
def test_every_node_once_after_its_dependencies_whatever_the_input_order(
    deps: dict[str, list[str]], rnd: random.Random
) -> None:
    order = dependencies_first(deps)
    assert sorted(order) == sorted(deps)
    place = {node: i for i, node in enumerate(order)}
    assert all(place[d] < place[n] for n, ds in deps.items() for d in ds)
    shuffled = list(deps.items())
    rnd.shuffle(shuffled)
    assert dependencies_first({n: rnd.sample(ds, len(ds)) for n, ds in shuffled}) == order


@given(dags(), st.data())
def test_an_edge_back_makes_a_cycle_error(deps: dict[str, list[str]], data: st.DataObject) -> None:
    order = dependencies_first(deps)
    pairs = [(n, d) for n, ds in deps.items() for d in ds]
    if not pairs:
        return
    node, dep = data.draw(st.sampled_from(pairs))
    cyclic = deps | {dep: [*deps[dep], node]}
    with pytest.raises(CycleError) as info:
        dependencies_first(cyclic)
    assert {node, dep} <= set(info.value.nodes) <= set(order)
