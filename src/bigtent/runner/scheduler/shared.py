"""A runner alone with its database, or one of several on a shared one: the scheduler's two
ways of treating the record, as one strategy object chosen at start (``database_mode``).

Alone (SQLite), the runner's memory is the record's exact copy: nothing is checked, claimed
or stored for anyone else, and a trusted build is admitted in stages. Shared (PostgreSQL,
docs/architecture.md "Several runners"), every transition checks the rows it relies on
(locked until it commits), a dispatch claims its steps, leases expire only when the database
agrees, renewals are stored for the other runners, and a build is admitted whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bigtent.runner.scheduler import persist, reads


class DatabaseMode(Protocol):
    shared: bool
    """Other runners may change the rows (the read model says so)."""

    def stages_admission(self, trusted: bool) -> bool:
        """Whether a build's plan is admitted in stages (a transaction per chunk, the build's
        roots last) rather than whole."""
        ...

    def cancels_rootless_builds(self) -> bool:
        """Whether a build found without roots at start was cut short while admitted here (so
        it is cancelled), rather than being admitted by another runner right now."""
        ...

    def stores_renewals(self) -> bool:
        """Whether lease renewals are written for other runners to see."""
        ...

    async def claim(self, conn: AsyncConnection, step_ids: Sequence[int]) -> set[int]:
        """Of the steps a dispatch chose, those this runner may assign."""
        ...

    async def rows_to_check(
        self, conn: AsyncConnection, step_ids: Sequence[int]
    ) -> Mapping[int, reads.LeaseRow] | None:
        """The steps' rows, locked until the transaction ends, to check against memory; None:
        memory is the record, nothing to check."""
        ...

    async def expiry_rows(
        self, engine: AsyncEngine, step_ids: Sequence[int]
    ) -> Mapping[int, reads.LeaseRow] | None:
        """The rows of steps whose leases are due here, to see whether the database agrees
        they expired; None: they expired, nobody else renews them."""
        ...


class SoleDatabase:
    """A runner alone with its database."""

    shared = False

    def stages_admission(self, trusted: bool) -> bool:
        return trusted  # an untrusted build's plan is split by trust as a whole

    def cancels_rootless_builds(self) -> bool:
        return True

    def stores_renewals(self) -> bool:
        return False

    async def claim(self, conn: AsyncConnection, step_ids: Sequence[int]) -> set[int]:
        return set(step_ids)

    async def rows_to_check(
        self, conn: AsyncConnection, step_ids: Sequence[int]
    ) -> Mapping[int, reads.LeaseRow] | None:
        return None

    async def expiry_rows(
        self, engine: AsyncEngine, step_ids: Sequence[int]
    ) -> Mapping[int, reads.LeaseRow] | None:
        return None


class SharedDatabase:
    """One of several runners on a shared database."""

    shared = True

    def stages_admission(self, trusted: bool) -> bool:
        return False  # other runners must never see a build without its roots

    def cancels_rootless_builds(self) -> bool:
        return False

    def stores_renewals(self) -> bool:
        return True

    async def claim(self, conn: AsyncConnection, step_ids: Sequence[int]) -> set[int]:
        return await persist.claim(conn, step_ids)

    async def rows_to_check(
        self, conn: AsyncConnection, step_ids: Sequence[int]
    ) -> Mapping[int, reads.LeaseRow] | None:
        return await reads.locked_rows(conn, step_ids)

    async def expiry_rows(
        self, engine: AsyncEngine, step_ids: Sequence[int]
    ) -> Mapping[int, reads.LeaseRow] | None:
        return await reads.expiry_rows(engine, step_ids)


def database_mode(shared: bool) -> DatabaseMode:
    """The strategy for a runner whose database is shared with other runners, or not."""
    return SharedDatabase() if shared else SoleDatabase()
