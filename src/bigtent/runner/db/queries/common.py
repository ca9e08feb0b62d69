"""What every query module shares: IN lists in chunks, row locks and INSERT ... ON CONFLICT DO
NOTHING for the connection's dialect."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Select, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

STORE = "/nix/store/"
CHUNK = 500
"""Rows per IN (...) query: well below SQLite's bound-parameter limit."""


def chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), CHUNK):
        yield items[i : i + CHUNK]


def for_update(conn: AsyncConnection, query: Select[Any], *, skip_locked: bool = False) -> Any:
    """``SELECT ... FOR UPDATE [SKIP LOCKED]`` on PostgreSQL: the rows stay locked until the
    transaction ends, so another runner's conflicting write waits (or, with ``skip_locked``,
    is passed over). SQLite has one writer at a time and no row locks: the query as is."""
    if conn.dialect.name == "postgresql":
        return query.with_for_update(skip_locked=skip_locked)
    return query


def insert_ignore(conn: AsyncConnection, table: Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING for the connection's dialect (built once per
    dialect and table: a statement is immutable, ``values`` and the like return new ones)."""
    return _insert_ignore(conn.dialect.name == "postgresql", table)


@functools.cache
def _insert_ignore(postgres: bool, table: Table) -> Any:
    if postgres:
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()
