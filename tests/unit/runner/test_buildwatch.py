"""``BuildWatch``: a request watching a build is woken by that build's change only (by a
step's end only if it waits for the steps), and leaves nothing behind."""

from __future__ import annotations

from bigtent.runner.buildwatch import BuildWatch


async def test_a_step_end_wakes_the_watchers_of_that_builds_steps_only() -> None:
    watch = BuildWatch()
    with (
        watch.watching(1, steps=True) as first,
        watch.watching(1, steps=False) as state_only,
        watch.watching(2, steps=True) as other,
    ):
        assert watch.waiters() == 3
        watch.steps_changed([1, 3])
        assert first.done()
        assert not state_only.done() and not other.done()
        watch.ended([1])
        assert state_only.done() and not other.done()
        watch.ended([2])
        assert other.done()
    assert watch.waiters() == 0


async def test_a_watch_that_ends_unchanged_is_forgotten() -> None:
    watch = BuildWatch()
    with watch.watching(7, steps=True) as future:
        assert watch.waiters() == 1
    assert watch.waiters() == 0
    watch.ended([7])
    assert not future.done()


async def test_a_change_before_the_wait_is_kept() -> None:
    """Watched before the build is read: a change during the read is not missed."""
    watch = BuildWatch()
    with watch.watching(4, steps=False) as future:
        watch.ended([4])
        await future
    assert watch.waiters() == 0
