"""Orders of a step graph (scheduler/graph.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bigtent.runner.scheduler.graph import dependencies_first, dependents_first
from bigtent.runner.scheduler.matching import Requirement
from bigtent.runner.scheduler.steps import StepNode
from bigtent.states import StepState


def dags() -> st.SearchStrategy[dict[str, list[str]]]:
    """Random DAGs over names n0..n9: a node depends only on lower-numbered ones."""
    return st.integers(min_value=1, max_value=10).flatmap(
        lambda n: st.tuples(
            *(
                st.sets(st.integers(min_value=0, max_value=i - 1)) if i else st.just(set())
                for i in range(n)
            )
        ).map(lambda deps: {f"n{i}": [f"n{d}" for d in sorted(ds)] for i, ds in enumerate(deps)})
    )


def test_dependencies_come_first_with_ties_by_name() -> None:
    deps = {"app": ["lib", "zlib"], "lib": ["zlib"], "zlib": [], "doc": []}
    assert dependencies_first(deps) == ["zlib", "lib", "app", "doc"]


@given(dags())
def test_every_node_comes_after_its_dependencies(deps: dict[str, list[str]]) -> None:
    order = dependencies_first(deps)
    assert sorted(order) == sorted(deps)
    at = {name: i for i, name in enumerate(order)}
    assert all(at[d] < at[name] for name, ds in deps.items() for d in ds)


@given(dags())
def test_every_step_comes_after_the_steps_that_depend_on_it(deps: dict[str, list[str]]) -> None:
    ids = {name: i for i, name in enumerate(sorted(deps))}
    nodes = {
        i: StepNode(i, name, Requirement("x86_64-linux", frozenset()), StepState.WAITING, 0.0)
        for name, i in ids.items()
    }
    for name, ds in deps.items():
        for d in ds:
            nodes[ids[name]].deps.add(ids[d])
            nodes[ids[d]].dependents.add(ids[name])
    order = dependents_first(nodes)
    assert sorted(order) == sorted(nodes)
    at = {sid: i for i, sid in enumerate(order)}
    assert all(at[dependent] < at[sid] for sid, n in nodes.items() for dependent in n.dependents)
