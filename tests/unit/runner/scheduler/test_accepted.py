"""Which steps a group of ``accepted`` messages starts (``results.accepted_nodes``)."""

from __future__ import annotations

from bigtent import protocol as p
from bigtent.runner.scheduler.matching import Requirement
from bigtent.runner.scheduler.results import accepted_nodes
from bigtent.runner.scheduler.steps import StepNode
from bigtent.states import StepState


def node(sid: int, state: StepState, lease: str | None) -> StepNode:
    n = StepNode(sid, f"/nix/store/{sid}.drv", Requirement("x86_64-linux", frozenset()), state, 0.0)
    n.lease_id = lease
    return n


def accept(sid: int, lease: str) -> p.Accepted:
    return p.Accepted(step_id=p.StepId(sid), lease_id=p.LeaseId(lease))


def test_only_steps_still_assigned_under_the_named_lease_start_each_once() -> None:
    nodes = {
        1: node(1, StepState.ASSIGNED, "a"),
        2: node(2, StepState.ASSIGNED, "b"),
        3: node(3, StepState.BUILDING, "c"),  # accepted before
        4: node(4, StepState.RUNNABLE, None),  # given back meanwhile
    }
    msgs = [
        accept(2, "b"),
        accept(1, "stale"),
        accept(3, "c"),
        accept(4, "d"),
        accept(9, "gone"),
        accept(2, "b"),  # sent again
        accept(1, "a"),
    ]
    assert [n.id for n in accepted_nodes(nodes, msgs)] == [2, 1]


def test_no_messages_start_nothing() -> None:
    assert accepted_nodes({1: node(1, StepState.ASSIGNED, "a")}, []) == []
