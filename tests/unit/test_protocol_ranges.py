"""Every numeric field of the agent protocol has a range, enforced where messages are parsed:
a number out of range is a ``ProtocolError`` naming the field, never a value that reaches the
database or a page."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent import protocol as p
from bigtent.apilimits import MAX_ID
from bigtent.errors import ProtocolError

_RESULT = {"type": "result", "step_id": 1, "lease_id": "l", "outcome": "success"}
_OUTPUT = {"name": "out", "path": "/nix/store/abc-x"}


def _text(message: dict[str, Any]) -> str:
    # json writes float("inf") as Infinity; a hostile agent writes 1e400, which parses to it.
    return json.dumps(message).replace("Infinity", "1e400")


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"type": "heartbeat", "memory_used_bytes": 10**400}, "memory_used_bytes"),
        ({"type": "heartbeat", "memory_total_bytes": 2**64}, "memory_total_bytes"),
        ({"type": "heartbeat", "free_store_bytes": -1}, "free_store_bytes"),
        ({"type": "heartbeat", "free_build_bytes": 2**63}, "free_build_bytes"),
        ({"type": "heartbeat", "load": float("inf")}, "load"),
        ({"type": "heartbeat", "load": -1.0}, "load"),
        ({"type": "heartbeat", "psi_cpu_some_avg10": 1e7}, "psi_cpu_some_avg10"),
        ({"type": "heartbeat", "running": [2**63]}, "running"),
        ({"type": "heartbeat", "running": [-1]}, "running"),
        ({**_RESULT, "exit_code": 10**30}, "exit_code"),
        ({**_RESULT, "exit_code": 2**31}, "exit_code"),
        ({**_RESULT, "step_id": 10**30}, "step_id"),
        ({**_RESULT, "timings": {"build_secs": -1}}, "build_secs"),
        ({**_RESULT, "timings": {"upload_secs": 1e12}}, "upload_secs"),
        ({**_RESULT, "timings": {"prepare_secs": float("inf")}}, "prepare_secs"),
        ({**_RESULT, "outputs": [{**_OUTPUT, "nar_size": 2**70}]}, "nar_size"),
        ({"type": "accepted", "step_id": 10**30, "lease_id": "l"}, "step_id"),
        ({"type": "refused", "step_id": -5, "lease_id": "l"}, "step_id"),
        ({"type": "log", "step_id": 2**64, "lease_id": "l", "lines": []}, "step_id"),
        # One past what a step's INTEGER column holds on PostgreSQL.
        ({"type": "accepted", "step_id": 2**31, "lease_id": "l"}, "step_id"),
        ({"type": "heartbeat", "running": [1, 2**31]}, "running"),
        (
            {
                "type": "register",
                "machine_id": "m",
                "name": "a",
                "systems": ["x86_64-linux"],
                "max_jobs": 1,
                "speed_factor": float("inf"),
            },
            "speed_factor",
        ),
        (
            {
                "type": "register",
                "machine_id": "m",
                "name": "a",
                "systems": ["x86_64-linux"],
                "max_jobs": 1,
                "running": [{"step_id": 10**20, "lease_id": "l"}],
            },
            "step_id",
        ),
        (
            {
                "type": "register",
                "machine_id": "m",
                "name": "a",
                "systems": ["x86_64-linux"],
                "max_jobs": 1,
                "free_store_bytes": 2**64,
            },
            "free_store_bytes",
        ),
    ],
)
def test_a_number_out_of_range_is_refused_naming_its_field(
    message: dict[str, Any], field: str
) -> None:
    with pytest.raises(ProtocolError) as caught:
        p.parse_agent_message(_text(message))
    assert field in str(caught.value)
    assert len(str(caught.value)) < 400  # the value is not echoed at length


def test_the_ends_of_each_range_are_accepted() -> None:
    beat = p.parse_agent_message(
        _text(
            {
                "type": "heartbeat",
                "memory_used_bytes": p.MAX_BYTES,
                "free_store_bytes": 0,
                "load": p.MAX_LOAD,
                "running": [0, MAX_ID],
            }
        )
    )
    assert isinstance(beat, p.Heartbeat) and beat.memory_used_bytes == p.MAX_BYTES
    for code in (-(2**31), 0, 2**31 - 1):
        result = p.parse_agent_message(_text({**_RESULT, "exit_code": code}))
        assert isinstance(result, p.Result) and result.exit_code == code


@given(
    st.one_of(
        st.integers(),
        st.floats(allow_nan=False),
        st.none(),
    )
)
def test_any_heartbeat_number_either_parses_within_range_or_is_a_protocol_error(
    value: int | float | None,
) -> None:
    text = _text({"type": "heartbeat", "memory_used_bytes": value, "load": value})
    try:
        beat = p.parse_agent_message(text)
    except ProtocolError:
        return
    assert isinstance(beat, p.Heartbeat)
    if beat.memory_used_bytes is not None:
        assert 0 <= beat.memory_used_bytes <= p.MAX_BYTES
    if beat.load is not None:
        assert 0 <= beat.load <= p.MAX_LOAD


def test_the_runner_cannot_send_what_an_agent_would_refuse() -> None:
    """Runner messages carry the same ranges: a config out of them is refused at load."""
    with pytest.raises(ValueError):
        p.Assign(
            step_id=p.StepId(1),
            lease_id=p.LeaseId("l"),
            drv_path="/nix/store/abc-x.drv",
            outputs={},
            upload_urls={},
            timeout_secs=float("inf"),
            max_silent_secs=1.0,
            max_log_bytes=1,
        )
