"""``BuildWatch``: a request watching a build is woken by that build's change only, and
leaves nothing behind."""

from __future__ import annotations

from bigtent.runner.buildwatch import BuildWatch


async def test_a_change_wakes_the_watchers_of_that_build_only() -> None:
    watch = BuildWatch()
    with watch.watching(1) as first, watch.watching(1) as second, watch.watching(2) as other:
        assert watch.waiters() == 3
        watch.changed([1, 3])
        assert first.done() and second.done()
        assert not other.done()
        watch.changed([2])
        assert other.done()
    assert watch.waiters() == 0


async def test_a_watch_that_ends_unchanged_is_forgotten() -> None:
    watch = BuildWatch()
    with watch.watching(7) as future:
        assert watch.waiters() == 1
    assert watch.waiters() == 0
    watch.changed([7])
    assert not future.done()


async def test_a_change_before_the_wait_is_kept() -> None:
    """Watched before the build is read: a change during the read is not missed."""
    watch = BuildWatch()
    with watch.watching(4) as future:
        watch.changed([4])
        await future
    assert watch.waiters() == 0
