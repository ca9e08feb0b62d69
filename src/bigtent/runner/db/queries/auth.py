"""Tokens created through the API (docs/security.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bigtent.runner.db.notify import note_tokens
from bigtent.runner.db.queries.common import insert_ignore
from bigtent.runner.db.tables import tokens


# ---- tokens (created through the API; docs/security.md) -------------------------------------
@dataclass(frozen=True, slots=True)
class StoredToken:
    """A token row: never the secret, only its digest."""

    name: str
    role: str
    sha256: str
    trusted: bool
    created_by: str
    created_at: float
    revoked_at: float | None


def _token(row: Any) -> StoredToken:
    return StoredToken(
        name=row.name,
        role=row.role,
        sha256=row.sha256,
        trusted=bool(row.trusted),
        created_by=row.created_by,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


async def insert_token(conn: AsyncConnection, token: StoredToken) -> bool:
    """Insert a token; False when its name (or digest) is taken, revoked or not."""
    values = {
        "name": token.name,
        "role": token.role,
        "sha256": token.sha256,
        "trusted": token.trusted,
        "created_by": token.created_by,
        "created_at": token.created_at,
        "revoked_at": token.revoked_at,
    }
    note_tokens(conn)
    result = await conn.execute(insert_ignore(conn, tokens).values(**values))
    return bool(result.rowcount)


async def fetch_tokens(conn: AsyncConnection, *, active_only: bool = False) -> list[StoredToken]:
    query = select(tokens).order_by(tokens.c.name)
    if active_only:
        query = query.where(tokens.c.revoked_at.is_(None))
    return [_token(r) for r in await conn.execute(query)]


async def fetch_token(conn: AsyncConnection, name: str) -> StoredToken | None:
    row = (await conn.execute(select(tokens).where(tokens.c.name == name))).first()
    return _token(row) if row is not None else None


async def revoke_token(conn: AsyncConnection, name: str, *, revoked_at: float) -> None:
    """Mark the token revoked (a no-op when it already is: the first time is kept)."""
    note_tokens(conn)
    await conn.execute(
        update(tokens)
        .where(tokens.c.name == name, tokens.c.revoked_at.is_(None))
        .values(revoked_at=revoked_at)
    )
