"""What an assignment carries of its derivation: the inputs resolved from the recorded
records, within the message's bounds, or nothing (the agent then fetches the .drv)."""

from __future__ import annotations

import json

import pytest

from bigtent import protocol as p
from bigtent.runner.scheduler.carried import Carried, carried, resolve_inputs
from bigtent.runner.scheduler.dispatch import with_derivation
from bigtent.runner.scheduler.reads import AssignedDrv

SRC = "/nix/store/1b9p07z77phvv2hf6gm9f28syp39f1ag-src"
DEP = "/nix/store/2b9p07z77phvv2hf6gm9f28syp39f1ag-dep.drv"
DEP_OUT = "/nix/store/3b9p07z77phvv2hf6gm9f28syp39f1ag-dep"
DEP_DEV = "/nix/store/4b9p07z77phvv2hf6gm9f28syp39f1ag-dep-dev"
TEXT = 'Derive([("out","/nix/store/x-hello","","")],[],[],"x86_64-linux","/bin/sh",[],[])'


def drv(text: str = TEXT, srcs: tuple[str, ...] = (SRC,)) -> AssignedDrv:
    return AssignedDrv(text, {DEP: ["out"]}, list(srcs))


OUTPUTS = {DEP: {"out": DEP_OUT, "dev": DEP_DEV}}


def test_inputs_are_the_sources_and_the_wanted_outputs() -> None:
    assert resolve_inputs(drv(), OUTPUTS) == [SRC, DEP_OUT]
    both = AssignedDrv(TEXT, {DEP: ["dev", "out"]}, [])
    assert resolve_inputs(both, OUTPUTS) == [DEP_OUT, DEP_DEV]


@pytest.mark.parametrize(
    "outputs",
    [{}, {DEP: {"dev": DEP_DEV}}, {DEP: {"out": ""}}],
    ids=["input-unrecorded", "output-missing", "output-floating"],
)
def test_an_unresolved_input_sends_nothing(outputs: dict[str, dict[str, str]]) -> None:
    assert resolve_inputs(drv(), outputs) is None
    assert carried(drv(), outputs) is None


def test_carried_within_the_bound() -> None:
    assert carried(drv(), OUTPUTS) == Carried(TEXT, [SRC, DEP_OUT])
    assert carried(None, OUTPUTS) is None
    inputs_json = len(SRC) + 3 + len(DEP_OUT) + 3
    # A text whose JSON just fits with the inputs, and one byte more.
    room = p.MAX_ASSIGN_DRV_BYTES - inputs_json - 2
    assert carried(drv("x" * room), OUTPUTS) is not None
    assert carried(drv("x" * (room + 1)), OUTPUTS) is None
    # Escapes count as sent: a text of quotes is twice as long in JSON.
    assert carried(drv('"' * (room // 2)), OUTPUTS) is not None
    assert carried(drv('"' * (room // 2 + 1)), OUTPUTS) is None


def test_too_many_inputs_send_nothing() -> None:
    many = tuple(f"/nix/store/{i:032d}-s" for i in range(p.MAX_ASSIGN_INPUTS))
    assert carried(drv(srcs=many[:-1]), OUTPUTS) is not None
    assert carried(drv(srcs=many), OUTPUTS) is None


def _assign() -> p.Assign:
    return p.Assign(
        step_id=p.StepId(1),
        lease_id=p.LeaseId("l"),
        drv_path="/nix/store/x-hello.drv",
        outputs={"out": "/nix/store/x-hello"},
        upload_urls={"out": "/u"},
        timeout_secs=1,
        max_silent_secs=1,
        max_log_bytes=1,
    )


def test_the_message_carries_it_and_fits() -> None:
    extra = carried(drv("\x01" * 40000), OUTPUTS)
    assert extra is not None
    msg = with_derivation(_assign(), extra)
    assert msg.drv_text == extra.drv_text and msg.inputs == [SRC, DEP_OUT]
    wire = p.encode(msg)
    assert len(wire.encode()) <= p.MAX_MESSAGE_BYTES
    assert json.loads(wire)["drv_text"] == extra.drv_text
    got = p.parse_runner_message(wire)
    assert isinstance(got, p.Assign) and got.drv_text == extra.drv_text
    # What an old runner sends: the message without the new fields still parses.
    old = json.loads(wire)
    del old["drv_text"], old["inputs"]
    plain = p.parse_runner_message(json.dumps(old))
    assert isinstance(plain, p.Assign) and plain.drv_text is None and plain.inputs is None


def test_a_message_that_would_not_validate_goes_without() -> None:
    bad = Carried(TEXT, ["not a store path"])
    msg = with_derivation(_assign(), bad)
    assert msg.drv_text is None and msg.inputs is None
