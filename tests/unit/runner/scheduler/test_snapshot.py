"""The scheduler's read model: plain values copied out of its venues (scheduler/snapshot.py)."""

from __future__ import annotations

import dataclasses

import pytest

from bigtent.runner.scheduler.model import SSH, Venue
from bigtent.runner.scheduler.snapshot import VenueInfo


def test_a_venue_info_is_a_copy_that_does_not_follow_the_venue() -> None:
    venue = Venue(
        "m1",
        "builder",
        frozenset({"x86_64-linux"}),
        frozenset({"kvm"}),
        frozenset(),
        4,
        2.0,
        print,
        running={1, 2},
        consecutive_failures=2,
        backoff_until=50.0,
        last_error="disk full",
        kind=SSH,
        trusted=False,
        repositories=frozenset({"o/r"}),
        free_store_bytes=10,
        launch_id="L1",
    )
    info = VenueInfo.of(venue)
    assert (info.machine_id, info.name, info.kind, info.max_jobs) == ("m1", "builder", SSH, 4)
    assert (info.running, info.consecutive_failures, info.backoff_until) == (2, 2, 50.0)
    assert (info.last_error, info.free_store_bytes, info.launch_id) == ("disk full", 10, "L1")
    assert not info.trusted and info.repositories == frozenset({"o/r"})
    assert info.view == venue.view()
    venue.running.add(3)
    venue.draining = True
    assert info.running == 2 and not info.draining
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.running = 5  # type: ignore[misc]
