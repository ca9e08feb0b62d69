"""The steps an agent holds (``agent/held.py``), driven without a runner or a network."""

from __future__ import annotations

import pytest

from bigtent.agent.held import Held, HeldStep
from bigtent.agent.stepstore import CacheSettings
from bigtent.protocol import (
    Abort,
    Assign,
    LeaseId,
    Log,
    Outcome,
    Result,
    ResultAck,
    RunningStep,
    StepId,
)

CACHE = CacheSettings("http://r/cache", "r-1:KEY")


def assign(step: int) -> Assign:
    return Assign(
        step_id=StepId(step),
        lease_id=LeaseId(f"lease-{step}"),
        drv_path=f"/nix/store/{'a' * 32}-s{step}.drv",
        outputs={},
        upload_urls={},
        timeout_secs=60,
        max_silent_secs=60,
        max_log_bytes=1 << 20,
    )


def result(step: int, lease: str | None = None) -> Result:
    return Result(
        step_id=StepId(step), lease_id=LeaseId(lease or f"lease-{step}"), outcome=Outcome.SUCCESS
    )


def holding(running: list[int], pending: list[int]) -> Held:
    held = Held()
    for step in running:
        held.running[StepId(step)] = HeldStep(assign(step), CACHE)
    for step in pending:
        held.pending[StepId(step)] = result(step)
    return held


def backlog_line(step: int) -> Log:
    return Log(step_id=StepId(step), lease_id=LeaseId(f"lease-{step}"), lines=["kept"])


@pytest.mark.parametrize(
    ("running", "pending", "step", "draining", "reason", "max_jobs", "refusal"),
    [
        ([], [], 1, False, None, 1, None),
        ([2], [], 1, False, None, 2, None),
        ([2], [3], 1, False, None, 2, None),  # a pending result takes no slot
        ([2], [], 1, False, None, 1, "no free slot (1/1 running)"),
        ([1], [], 1, False, None, 4, "the agent already holds step 1"),
        ([], [1], 1, False, None, 4, "the agent already holds step 1"),
        ([], [], 1, True, None, 4, "the agent is draining"),
        ([], [], 1, True, "max_builds reached", 4, "the agent is draining: max_builds reached"),
    ],
)
def test_refusal(
    running: list[int],
    pending: list[int],
    step: int,
    draining: bool,
    reason: str | None,
    max_jobs: int,
    refusal: str | None,
) -> None:
    held = holding(running, pending)
    got = held.refusal(assign(step), draining=draining, drain_reason=reason, max_jobs=max_jobs)
    assert got == refusal


def test_register_and_heartbeats_name_every_held_step() -> None:
    held = holding([3, 1], [2])
    assert held.ids() == [1, 2, 3]
    assert held.count == 3
    assert sorted(held.leases(), key=lambda r: r.step_id) == [
        RunningStep(step_id=StepId(1), lease_id=LeaseId("lease-1")),
        RunningStep(step_id=StepId(2), lease_id=LeaseId("lease-2")),
        RunningStep(step_id=StepId(3), lease_id=LeaseId("lease-3")),
    ]


def test_keep_only_aborts_and_drops_what_the_runner_let_go() -> None:
    held = holding([1, 2], [3, 4])
    for step in (1, 3, 4):
        held.backlog.add(backlog_line(step))
    held.keep_only({StepId(2), StepId(4)})
    assert held.running[StepId(1)].lease_lost and held.running[StepId(1)].abort.is_set()
    assert not held.running[StepId(2)].abort.is_set()
    assert sorted(held.pending) == [4]
    assert held.backlog.steps == [4]


def test_a_finished_step_waits_for_its_ack_unless_its_lease_was_lost() -> None:
    held = holding([1, 2], [])
    assert held.finished(held.running[StepId(1)], result(1))
    assert sorted(held.pending) == [1] and sorted(held.running) == [2]
    lost = held.running[StepId(2)]
    lost.lease_lost = True
    held.backlog.add(backlog_line(2))
    assert not held.finished(lost, result(2))
    assert sorted(held.pending) == [1] and held.running == {} and held.backlog.steps == []


@pytest.mark.parametrize(
    ("ack", "matched", "pending_after"),
    [
        (ResultAck(step_id=StepId(1), lease_id=LeaseId("lease-1"), recorded=True), True, [2]),
        (ResultAck(step_id=StepId(1), lease_id=LeaseId("lease-1"), recorded=False), True, [2]),
        (ResultAck(step_id=StepId(1), lease_id=LeaseId("old"), recorded=True), False, [1, 2]),
        (ResultAck(step_id=StepId(9), lease_id=LeaseId("lease-9"), recorded=True), False, [1, 2]),
    ],
)
def test_acknowledged(ack: ResultAck, matched: bool, pending_after: list[int]) -> None:
    held = holding([], [1, 2])
    held.backlog.add(backlog_line(1))
    assert held.acknowledged(ack) is matched
    assert sorted(held.pending) == pending_after
    assert held.backlog.steps == ([] if matched else [1])


def test_the_runner_s_abort_is_remembered_until_the_ack(caplog: pytest.LogCaptureFixture) -> None:
    held = holding([1], [])
    held.runner_abort(Abort(step_id=StepId(1), reason="cancelled"))
    held.runner_abort(Abort(step_id=StepId(7)))  # not here
    assert held.running[StepId(1)].abort.is_set()
    assert held.runner_aborted == {"lease-1": "cancelled"}
    held.finished(held.running[StepId(1)], result(1))
    caplog.set_level("INFO", logger="bigtent.agent.held")
    held.acknowledged(ResultAck(step_id=StepId(1), lease_id=LeaseId("lease-1"), recorded=False))
    assert held.runner_aborted == {}
    assert "the runner no longer needs its result" in caplog.text


def test_abort_all_sets_every_running_step_s_abort() -> None:
    held = holding([1, 2], [3])
    held.abort_all("stopping")
    assert all(step.abort.is_set() for step in held.running.values())
