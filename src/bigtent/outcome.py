"""What a Nix build's end means for its step, classified once (pure).

Every venue ends a step the same way: an agent's ``nix-store --realise`` and the runner's SSH
builders (``runner/venues/sshvenue.py``) by ``nix-store``'s exit status (``RealiseStatus``), an
agent's serve process by the ``BuildResult`` status of ``cmdBuildDerivation``
(``BuildStatus``), which is first mapped to what ``nix-store --realise`` would have made of
it. So one build fails alike on every venue. What the scheduler then does with an
``Outcome`` (fail, retry, requeue) is ``runner/scheduler/leases.classify``.
"""

from __future__ import annotations

from typing import assert_never

from bigtent.nix.serve import BuildStatus
from bigtent.nix.store import RealiseStatus
from bigtent.protocol import Outcome


def outcome_of(status: RealiseStatus) -> Outcome:
    """Classify a realise: Nix exiting 1 (inputs not substitutable, store trouble, SSH trouble)
    is a ``prepare_failure`` (infrastructure, retried elsewhere); the rest map one to one."""
    match status:
        case RealiseStatus.SUCCESS:
            return Outcome.SUCCESS
        case RealiseStatus.BUILD_FAILURE:
            return Outcome.BUILD_FAILURE
        case RealiseStatus.TIMED_OUT:
            return Outcome.TIMED_OUT
        case RealiseStatus.LOG_LIMIT:
            return Outcome.LOG_LIMIT
        case RealiseStatus.ABORTED:
            return Outcome.ABORTED
        case RealiseStatus.OTHER_FAILURE:
            return Outcome.PREPARE_FAILURE
        case _:
            assert_never(status)


def realise_status_of(status: BuildStatus | int) -> RealiseStatus:
    """What ``nix-store --realise`` would have made of a ``BuildResult`` status, so that both
    executors classify a step the same way (``outcome_of``): Nix's exit status is 100 plus bits
    for permanent failure, timeout, hash mismatch and check mismatch, and 1 for anything else
    (transient failures such as a failed fixed-output fetch, dependency and misc failures)."""
    match status:
        case (
            BuildStatus.BUILT
            | BuildStatus.SUBSTITUTED
            | BuildStatus.ALREADY_VALID
            | BuildStatus.RESOLVES_TO_ALREADY_VALID
        ):
            return RealiseStatus.SUCCESS
        case (
            BuildStatus.PERMANENT_FAILURE
            | BuildStatus.OUTPUT_REJECTED
            | BuildStatus.NOT_DETERMINISTIC
        ):
            return RealiseStatus.BUILD_FAILURE
        case BuildStatus.TIMED_OUT:
            return RealiseStatus.TIMED_OUT
        case BuildStatus.LOG_LIMIT_EXCEEDED:
            return RealiseStatus.LOG_LIMIT
        case _:
            return RealiseStatus.OTHER_FAILURE


def exit_code_of(status: BuildStatus | int) -> int:
    """The exit status ``nix-store --realise`` would have had (reported in ``result``)."""
    match status:
        case BuildStatus.PERMANENT_FAILURE:
            return 100
        case BuildStatus.TIMED_OUT:
            return 101
        case BuildStatus.OUTPUT_REJECTED:
            return 102
        case BuildStatus.NOT_DETERMINISTIC:
            return 104
        case _:
            return 0 if realise_status_of(status) is RealiseStatus.SUCCESS else 1
