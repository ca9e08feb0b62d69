"""The phases of a step on the agent, for its log line (``executor.phase_times``)."""

from __future__ import annotations

import pytest

from bigtent.agent.build import Built
from bigtent.agent.executor import phase_text, phase_times
from bigtent.nix.store import RealiseResult, RealiseStatus

OK = RealiseResult(RealiseStatus.SUCCESS, 0)


@pytest.mark.parametrize(
    ("built", "ended", "uploaded", "expected"),
    [
        # serve: derivations read at 10.5, build from 10.75 to 11.5, uploaded at 12
        (
            Built(OK, 10.0, 10.75, fetched=10.5),
            11.5,
            12.0,
            {"fetch": 0.5, "substitute": 0.25, "build": 0.75, "upload": 0.5},
        ),
        # realise: no fetch of its own (Nix substitutes the .drv closure)
        (
            Built(OK, 10.0, 10.5),
            11.0,
            11.25,
            {"substitute": 0.5, "build": 0.5, "upload": 0.25},
        ),
        # failed before the build began: substituting until the end, no upload
        (
            Built(RealiseResult(RealiseStatus.OTHER_FAILURE, 1), 10.0, None, fetched=10.25),
            10.5,
            None,
            {"fetch": 0.25, "substitute": 0.25},
        ),
        # the build failed: no upload
        (
            Built(RealiseResult(RealiseStatus.BUILD_FAILURE, 1), 10.0, 10.5, fetched=10.25),
            11.0,
            None,
            {"fetch": 0.25, "substitute": 0.25, "build": 0.5},
        ),
    ],
)
def test_phase_times(
    built: Built, ended: float, uploaded: float | None, expected: dict[str, float]
) -> None:
    phases = phase_times(built, ended, uploaded)
    assert list(phases) == list(expected)  # in the order they happen
    assert phases == pytest.approx(expected)


def test_phase_text() -> None:
    assert phase_text({"fetch": 0.0304, "build": 1.5}) == "fetch 0.030 s, build 1.500 s"
    assert phase_text({}) == ""
