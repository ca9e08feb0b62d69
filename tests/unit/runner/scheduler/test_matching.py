"""Venue matching (architecture §5): ``can_run``, tie-breaks of ``venue_rank``/``best_venue``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.runner.scheduler.matching import (
    Requirement,
    VenuePool,
    VenueView,
    best_venue,
    can_run,
    contended_waste,
    has_room,
    venue_rank,
)

X86 = "x86_64-linux"
ARM = "aarch64-linux"


def venue(
    machine_id: str = "m",
    systems: tuple[str, ...] = (X86,),
    supported: tuple[str, ...] = (),
    mandatory: tuple[str, ...] = (),
    max_jobs: int = 1,
    running: int = 0,
    speed: float = 1.0,
) -> VenueView:
    return VenueView(
        machine_id,
        frozenset(systems),
        frozenset(supported),
        frozenset(mandatory),
        max_jobs,
        running,
        speed,
    )


def req(system: str = X86, *features: str) -> Requirement:
    return Requirement(system, frozenset(features))


@pytest.mark.parametrize(
    ("v", "r", "expected"),
    [
        pytest.param(venue(), req(), True, id="plain-on-plain"),
        pytest.param(venue(), req(ARM), False, id="wrong-system"),
        pytest.param(venue(systems=(X86, ARM)), req(ARM), True, id="one-of-several-systems"),
        pytest.param(venue(), req(X86, "kvm"), False, id="unsupported-feature"),
        pytest.param(venue(supported=("kvm",)), req(X86, "kvm"), True, id="supported-feature"),
        pytest.param(
            venue(supported=("kvm",)), req(X86, "kvm", "big-parallel"), False, id="one-missing"
        ),
        pytest.param(venue(supported=("kvm", "big-parallel")), req(), True, id="superset-ok"),
        pytest.param(venue(mandatory=("benchmark",)), req(), False, id="mandatory-not-required"),
        pytest.param(
            venue(mandatory=("benchmark",)), req(X86, "benchmark"), True, id="mandatory-required"
        ),
        pytest.param(
            venue(supported=("kvm",), mandatory=("benchmark",)),
            req(X86, "kvm"),
            False,
            id="mandatory-missing-among-others",
        ),
        pytest.param(
            venue(supported=("kvm",), mandatory=("benchmark",)),
            req(X86, "kvm", "benchmark"),
            True,
            id="mandatory-and-supported",
        ),
        pytest.param(
            venue(mandatory=("benchmark",)), req(ARM, "benchmark"), False, id="mandatory-wrong-sys"
        ),
        pytest.param(venue(max_jobs=1, running=1), req(), True, id="slots-are-not-can-run"),
    ],
)
def test_can_run(v: VenueView, r: Requirement, expected: bool) -> None:
    assert can_run(v, r) is expected


FEATURES = ("kvm", "big-parallel", "benchmark")
features = st.frozensets(st.sampled_from(FEATURES))


@given(
    systems=st.frozensets(st.sampled_from((X86, ARM)), min_size=1),
    supported=features,
    mandatory=features,
    system=st.sampled_from((X86, ARM)),
    required=features,
)
def test_can_run_is_the_design_predicate(
    systems: frozenset[str],
    supported: frozenset[str],
    mandatory: frozenset[str],
    system: str,
    required: frozenset[str],
) -> None:
    v = VenueView("m", systems, supported, mandatory, 1, 0)
    expected = system in systems and required <= (supported | mandatory) and mandatory <= required
    assert can_run(v, Requirement(system, required)) is expected


@pytest.mark.parametrize(
    ("max_jobs", "running", "free"), [(4, 0, 4), (4, 3, 1), (4, 4, 0), (2, 5, 0), (0, 0, 0)]
)
def test_free_slots_never_negative(max_jobs: int, running: int, free: int) -> None:
    assert venue(max_jobs=max_jobs, running=running).free_slots == free


def test_contended_waste_counts_only_features_other_work_wants() -> None:
    kvm_box = venue("kvm", supported=("kvm", "big-parallel"))
    assert contended_waste(kvm_box, req(), wanted=()) == 0
    assert contended_waste(kvm_box, req(), wanted=("kvm",)) == 1
    assert contended_waste(kvm_box, req(), wanted=("kvm", "big-parallel")) == 2
    # A feature the step needs itself is not wasted.
    assert contended_waste(kvm_box, req(X86, "kvm"), wanted=("kvm",)) == 0
    # Mandatory features are offered too (though can_run keeps such steps away anyway).
    assert contended_waste(venue(mandatory=("kvm",)), req(), wanted=("kvm",)) == 1


def test_plain_step_keeps_the_kvm_venue_free_when_kvm_work_waits() -> None:
    kvm_box = venue("a-kvm", supported=("kvm",), max_jobs=32, speed=4.0)
    plain = venue("z-plain", max_jobs=1)
    # Although the kvm box is bigger, faster and sorts first, kvm work is waiting.
    chosen = best_venue([kvm_box, plain], req(), wanted={"kvm"})
    assert chosen is not None and chosen.machine_id == "z-plain"
    # With no kvm work waiting, capacity times speed decides.
    chosen = best_venue([kvm_box, plain], req(), wanted=set())
    assert chosen is not None and chosen.machine_id == "a-kvm"


def test_kvm_step_goes_to_the_kvm_venue() -> None:
    chosen = best_venue(
        [venue("plain", max_jobs=8), venue("kvm", supported=("kvm",))],
        req(X86, "kvm"),
        wanted={"kvm"},
    )
    assert chosen is not None and chosen.machine_id == "kvm"


@pytest.mark.parametrize(
    ("venues", "expected"),
    [
        pytest.param([venue("a", max_jobs=2), venue("b", max_jobs=4)], "b", id="more-free"),
        pytest.param(
            [venue("a", max_jobs=4, running=3), venue("b", max_jobs=2)], "b", id="free-not-max"
        ),
        pytest.param(
            [venue("a", max_jobs=4, speed=1.0), venue("b", max_jobs=2, speed=3.0)],
            "b",
            id="capacity-times-speed",
        ),
        pytest.param([venue("b", max_jobs=2), venue("a", max_jobs=2)], "a", id="machine-id-tie"),
        pytest.param(
            [venue("a", max_jobs=1, running=1), venue("b", max_jobs=1)], "b", id="full-skipped"
        ),
        pytest.param([venue("a", systems=(ARM,)), venue("b")], "b", id="incapable-skipped"),
        pytest.param([venue("a", max_jobs=1, running=1)], None, id="none-free"),
        pytest.param([], None, id="no-venues"),
    ],
)
def test_best_venue_tie_breaks(venues: list[VenueView], expected: str | None) -> None:
    chosen = best_venue(venues, req(), wanted=())
    assert (chosen.machine_id if chosen else None) == expected


def test_venue_rank_orders_waste_then_capacity_then_id() -> None:
    r = req()
    ranks = sorted(
        [
            venue_rank(venue("c", supported=("kvm",), max_jobs=9), r, {"kvm"}),
            venue_rank(venue("b", max_jobs=1), r, {"kvm"}),
            venue_rank(venue("a", max_jobs=1), r, {"kvm"}),
            venue_rank(venue("d", max_jobs=3), r, {"kvm"}),
        ]
    )
    assert [rank[2] for rank in ranks] == ["d", "a", "b", "c"]


venue_views = st.builds(
    VenueView,
    machine_id=st.text("abcdef", min_size=1, max_size=3),
    systems=st.frozensets(st.sampled_from((X86, ARM)), min_size=1),
    supported_features=features,
    mandatory_features=st.frozensets(st.sampled_from(("benchmark",))),
    max_jobs=st.integers(0, 4),
    running=st.integers(0, 4),
    speed_factor=st.sampled_from((0.5, 1.0, 2.0)),
)


@given(
    venues=st.lists(venue_views, max_size=6, unique_by=lambda v: v.machine_id),
    system=st.sampled_from((X86, ARM)),
    required=features,
    wanted=features,
    data=st.data(),
)
def test_best_venue_is_deterministic_for_any_order(
    venues: list[VenueView],
    system: str,
    required: frozenset[str],
    wanted: frozenset[str],
    data: st.DataObject,
) -> None:
    r = Requirement(system, required)
    chosen = best_venue(venues, r, wanted)
    shuffled = data.draw(st.permutations(venues))
    assert best_venue(shuffled, r, wanted) == chosen
    capable = [v for v in venues if v.free_slots > 0 and can_run(v, r)]
    if chosen is None:
        assert not capable
    else:
        assert chosen in capable
        assert all(venue_rank(chosen, r, wanted) <= venue_rank(v, r, wanted) for v in capable)


@given(
    venues=st.lists(venue_views, max_size=8, unique_by=lambda v: v.machine_id),
    reqs=st.lists(st.tuples(st.sampled_from((X86, ARM)), features), min_size=1, max_size=12),
    wanted=features,
)
def test_venue_pool_chooses_as_best_venue_while_slots_are_used(
    venues: list[VenueView], reqs: list[tuple[str, frozenset[str]]], wanted: frozenset[str]
) -> None:
    """The pool groups venues by capabilities; its choice is ``best_venue``'s over the same
    venues, also after earlier choices used up slots."""
    pool = VenuePool(venues)
    current = {v.machine_id: v for v in venues}
    for system, required in reqs:
        r = Requirement(system, required)
        expected = best_venue(list(current.values()), r, wanted)
        chosen = pool.best(r, wanted)
        assert chosen == expected
        if chosen is not None:
            pool.take(chosen)
            current[chosen.machine_id] = VenueView(
                chosen.machine_id,
                chosen.systems,
                chosen.supported_features,
                chosen.mandatory_features,
                chosen.max_jobs,
                chosen.running + 1,
                chosen.speed_factor,
            )
    assert bool(pool) == any(v.free_slots > 0 for v in current.values())


@pytest.mark.parametrize(
    ("free", "minimum", "room"),
    [
        (None, 1000, True),  # says nothing (an older agent, an SSH builder)
        (0, 0, True),  # no minimum configured
        (999, 1000, False),
        (1000, 1000, True),
        (10**12, 1000, True),
        (0, 1, False),
    ],
)
def test_has_room(free: int | None, minimum: int, room: bool) -> None:
    assert has_room(free, minimum) is room
