"""Waiting for capacity: which steps no venue can take, why, and when they give up (pure)."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import pytest

from bigtent.runner.scheduler.capacity import (
    assess,
    capable,
    step_is_met,
    unmet_requirements,
    unsupported_error,
    waiting_reason,
)
from bigtent.runner.scheduler.matching import Requirement, VenueView

X86 = "x86_64-linux"
ARM = "aarch64-linux"


def venue(
    systems: Collection[str] = (X86,),
    supported: Collection[str] = (),
    mandatory: Collection[str] = (),
    *,
    trusted: bool = True,
    repositories: Collection[str] | None = None,
) -> VenueView:
    return VenueView(
        "m",
        frozenset(systems),
        frozenset(supported),
        frozenset(mandatory),
        max_jobs=1,
        running=1,  # busy: load never matters for capacity
        trusted=trusted,
        repositories=None if repositories is None else frozenset(repositories),
    )


def req(system: str = X86, *features: str, trusted: bool = True) -> Requirement:
    return Requirement(system, frozenset(features), trusted)


@pytest.mark.parametrize(
    ("requirement", "reason"),
    [
        (req(ARM), "waiting for capacity: no agent offers aarch64-linux"),
        (req(ARM, "kvm"), "waiting for capacity: no agent offers aarch64-linux (features: kvm)"),
        (
            req(X86, "kvm", "big-parallel"),
            "waiting for capacity: no agent offers x86_64-linux (features: big-parallel, kvm)",
        ),
        (
            req(X86, trusted=False),
            "waiting for capacity: no agent offers x86_64-linux for untrusted builds",
        ),
    ],
)
def test_waiting_reason(requirement: Requirement, reason: str) -> None:
    assert waiting_reason(requirement) == reason


@pytest.mark.parametrize(
    ("secs", "text"),
    [(3.2, "3.2 s"), (119, "1 min 59 s"), (600, "10 min 00 s"), (4 * 3600, "4 h 00 min")],
)
def test_unsupported_error_names_the_reason_and_the_wait(secs: float, text: str) -> None:
    assert unsupported_error(req(ARM), secs) == (
        f"waiting for capacity: no agent offers aarch64-linux; gave up after {text}"
    )


@pytest.mark.parametrize(
    ("offers", "requirement", "unscoped", "none"),
    [
        ([], req(X86), False, True),
        ([venue()], req(X86), True, False),
        ([venue()], req(ARM), False, True),
        ([venue((X86, ARM))], req(ARM), True, False),
        # A required feature no venue supports; then one that does.
        ([venue()], req(X86, "kvm"), False, True),
        ([venue(), venue(supported=["kvm"])], req(X86, "kvm"), True, False),
        # A mandatory feature counts as supported, but keeps away steps that lack it.
        ([venue(mandatory=["kvm"])], req(X86, "kvm"), True, False),
        ([venue(mandatory=["kvm"])], req(X86), False, True),
        # Trust: a trusted step needs a trusted venue, an untrusted one an untrusted venue.
        ([venue(trusted=False)], req(X86), False, True),
        ([venue()], req(X86, trusted=False), False, True),
        ([venue(trusted=False)], req(X86, trusted=False), True, False),
        # Scoped venues can run it, but only for their repositories.
        ([venue(repositories=["o/a"])], req(X86), False, False),
    ],
)
def test_capable_follows_matching(
    offers: list[VenueView], requirement: Requirement, unscoped: bool, none: bool
) -> None:
    cap = capable(requirement, offers)
    assert (cap.unscoped, cap.none) == (unscoped, none)


@pytest.mark.parametrize(
    ("repositories", "met"),
    [({"o/a"}, True), ({"o/b"}, True), ({"o/c"}, False), ({None}, False), ({None, "o/b"}, True)],
)
def test_scoped_offers_meet_steps_of_their_repositories(
    repositories: set[str | None], met: bool
) -> None:
    cap = capable(req(X86), [venue(repositories=["o/a"]), venue(repositories=["o/b"])])
    assert len(cap.scoped) == 2
    assert step_is_met(cap, repositories) is met


def _assess(
    runnable: Mapping[Requirement, list[int]],
    offers: list[VenueView],
    previous: Mapping[int, float] | None = None,
    now: float = 100.0,
    grace: float = 10.0,
    repositories: Mapping[int, set[str | None]] | None = None,
) -> tuple[dict[int, float], list[int], float | None]:
    looked: list[Requirement] = []

    def steps_of(r: Requirement) -> list[int]:
        looked.append(r)
        return runnable[r]

    verdict = assess(
        runnable,
        steps_of,
        offers,
        lambda sid: (repositories or {}).get(sid, {None}),
        previous or {},
        now,
        grace,
    )
    # Requirements an unscoped offer can run are never scanned step by step.
    assert all(not capable(r, offers).unscoped for r in looked)
    return verdict.waiting, verdict.unsupported, verdict.next_deadline


def test_steps_no_offer_can_take_wait_from_now() -> None:
    waiting, unsupported, deadline = _assess({req(X86): [1, 2], req(ARM): [3]}, [venue()])
    assert waiting == {3: 100.0}
    assert unsupported == []
    assert deadline == 110.0


def test_a_step_keeps_its_start_and_fails_at_the_grace() -> None:
    runnable = {req(ARM): [3, 4], req(ARM, "kvm"): [5]}
    waiting, unsupported, deadline = _assess(runnable, [], previous={3: 90.0, 4: 95.0}, now=100.0)
    assert waiting == {3: 90.0, 4: 95.0, 5: 100.0}
    assert unsupported == [3]  # waited exactly the grace
    assert deadline == 105.0  # step 4's


def test_a_venue_that_can_take_it_clears_the_wait() -> None:
    waiting, unsupported, deadline = _assess(
        {req(ARM): [3]}, [venue((ARM,))], previous={3: 10.0}, now=100.0
    )
    assert (waiting, unsupported, deadline) == ({}, [], None)


def test_steps_that_left_the_queue_leave_the_wait() -> None:
    waiting, _, _ = _assess({req(ARM): [4]}, [], previous={3: 10.0, 4: 50.0}, now=55.0)
    assert waiting == {4: 50.0}


def test_scoped_offers_are_judged_per_step() -> None:
    offers = [venue(repositories=["o/a"])]
    waiting, _, _ = _assess(
        {req(X86): [1, 2, 3]},
        offers,
        repositories={1: {"o/a"}, 2: {"o/b"}, 3: {None}},
    )
    assert waiting == {2: 100.0, 3: 100.0}


def test_zero_grace_fails_at_once() -> None:
    waiting, unsupported, deadline = _assess({req(ARM): [7]}, [], grace=0.0)
    assert waiting == {7: 100.0} and unsupported == [7] and deadline is None


def test_unmet_requirements_are_those_no_unscoped_offer_runs() -> None:
    offers = [venue((X86,), ["kvm"]), venue((ARM,), repositories=["o/a"])]
    reqs = [req(X86), req(X86, "kvm"), req(ARM), req(X86, "big-parallel")]
    assert unmet_requirements(reqs, offers) == [req(ARM), req(X86, "big-parallel")]
    assert unmet_requirements(reqs, []) == reqs
