"""How a Nix build's end classifies its step (``bigtent/outcome.py``), for every venue."""

from __future__ import annotations

import pytest

from bigtent.nix.serve import BuildStatus
from bigtent.nix.store import RealiseStatus, classify_exit
from bigtent.outcome import exit_code_of, outcome_of, realise_status_of
from bigtent.protocol import Outcome


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (RealiseStatus.SUCCESS, Outcome.SUCCESS),
        (RealiseStatus.BUILD_FAILURE, Outcome.BUILD_FAILURE),
        (RealiseStatus.TIMED_OUT, Outcome.TIMED_OUT),
        (RealiseStatus.LOG_LIMIT, Outcome.LOG_LIMIT),
        (RealiseStatus.ABORTED, Outcome.ABORTED),
        (RealiseStatus.OTHER_FAILURE, Outcome.PREPARE_FAILURE),
    ],
)
def test_outcome_of(status: RealiseStatus, outcome: Outcome) -> None:
    assert outcome_of(status) is outcome


def test_every_realise_status_has_an_outcome() -> None:
    assert {outcome_of(s) for s in RealiseStatus} <= set(Outcome)


@pytest.mark.parametrize(
    ("status", "realised", "exit_code", "outcome"),
    [
        (BuildStatus.BUILT, RealiseStatus.SUCCESS, 0, Outcome.SUCCESS),
        (BuildStatus.SUBSTITUTED, RealiseStatus.SUCCESS, 0, Outcome.SUCCESS),
        (BuildStatus.ALREADY_VALID, RealiseStatus.SUCCESS, 0, Outcome.SUCCESS),
        (BuildStatus.RESOLVES_TO_ALREADY_VALID, RealiseStatus.SUCCESS, 0, Outcome.SUCCESS),
        (BuildStatus.PERMANENT_FAILURE, RealiseStatus.BUILD_FAILURE, 100, Outcome.BUILD_FAILURE),
        (BuildStatus.OUTPUT_REJECTED, RealiseStatus.BUILD_FAILURE, 102, Outcome.BUILD_FAILURE),
        (BuildStatus.NOT_DETERMINISTIC, RealiseStatus.BUILD_FAILURE, 104, Outcome.BUILD_FAILURE),
        (BuildStatus.TIMED_OUT, RealiseStatus.TIMED_OUT, 101, Outcome.TIMED_OUT),
        (BuildStatus.LOG_LIMIT_EXCEEDED, RealiseStatus.LOG_LIMIT, 1, Outcome.LOG_LIMIT),
        (BuildStatus.TRANSIENT_FAILURE, RealiseStatus.OTHER_FAILURE, 1, Outcome.PREPARE_FAILURE),
        (BuildStatus.MISC_FAILURE, RealiseStatus.OTHER_FAILURE, 1, Outcome.PREPARE_FAILURE),
        (BuildStatus.DEPENDENCY_FAILED, RealiseStatus.OTHER_FAILURE, 1, Outcome.PREPARE_FAILURE),
        (BuildStatus.INPUT_REJECTED, RealiseStatus.OTHER_FAILURE, 1, Outcome.PREPARE_FAILURE),
        (99, RealiseStatus.OTHER_FAILURE, 1, Outcome.PREPARE_FAILURE),
    ],
)
def test_a_build_result_classifies_like_realise(
    status: BuildStatus | int, realised: RealiseStatus, exit_code: int, outcome: Outcome
) -> None:
    assert realise_status_of(status) is realised
    assert exit_code_of(status) == exit_code
    assert outcome_of(realise_status_of(status)) is outcome


@pytest.mark.parametrize(
    "status", [s for s in BuildStatus if s is not BuildStatus.LOG_LIMIT_EXCEEDED]
)
def test_the_serve_exit_code_means_what_realise_would_have_meant(status: BuildStatus) -> None:
    """A serve step's reported exit code is one ``nix-store --realise`` gives for its class."""
    assert classify_exit(exit_code_of(status)) is realise_status_of(status)
