"""Alone with the database or sharing it: the scheduler's strategy (scheduler/shared.py).
The shared strategy's queries run in tests/integration/runner/test_several_runners.py."""

from __future__ import annotations

from typing import Any, cast

import pytest

from bigtent.runner.scheduler.shared import SharedDatabase, SoleDatabase, database_mode


@pytest.mark.parametrize(
    ("shared", "trusted", "staged", "cancels", "renewals"),
    [
        (False, True, True, True, False),
        (False, False, False, True, False),
        (True, True, False, False, True),
        (True, False, False, False, True),
    ],
)
def test_what_each_mode_does(
    shared: bool, trusted: bool, staged: bool, cancels: bool, renewals: bool
) -> None:
    mode = database_mode(shared)
    assert isinstance(mode, SharedDatabase if shared else SoleDatabase)
    assert mode.shared is shared
    assert mode.stages_admission(trusted) is staged
    assert mode.cancels_rootless_builds() is cancels
    assert mode.stores_renewals() is renewals


async def test_alone_every_chosen_step_is_claimed_and_nothing_is_checked() -> None:
    mode = SoleDatabase()
    no_conn = cast(Any, None)  # alone with the database, no query is made
    assert await mode.claim(no_conn, [3, 1, 2]) == {1, 2, 3}
    assert await mode.rows_to_check(no_conn, [1]) is None
    assert await mode.expiry_rows(no_conn, [1]) is None
