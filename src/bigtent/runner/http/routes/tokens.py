"""``/api/v1/tokens``: stored tokens, created, listed and revoked by an admin."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from bigtent.apimodels import CreatedToken, TokenInfo, Tokens
from bigtent.config import Role
from bigtent.runner.db import queries
from bigtent.runner.http.deps import AdminAuth, Comps, iso

router = APIRouter()


class TokenBody(BaseModel):
    role: Role
    name: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$"
    )
    trusted: bool = False


def _token_info(t: queries.StoredToken) -> TokenInfo:
    """A stored token as the API shows it: never the digest."""
    return TokenInfo(
        name=t.name,
        role=t.role,
        trusted=t.trusted,
        created_by=t.created_by,
        created_at=iso(t.created_at),
        revoked_at=iso(t.revoked_at),
    )


@router.post("/tokens", status_code=201)
async def create_token(body: TokenBody, comps: Comps, who: AdminAuth) -> CreatedToken:
    """Store a new token; its secret is in this answer and nowhere else."""
    token, secret = await comps.token_store.create(
        body.role,
        body.name,
        trusted=body.trusted,
        created_by=who.name,
        now=comps.scheduler.clock(),
    )
    return CreatedToken(**_token_info(token).model_dump(), token=secret)


@router.get("/tokens")
async def list_tokens(comps: Comps, _: AdminAuth) -> Tokens:
    return Tokens(tokens=[_token_info(t) for t in await comps.token_store.fetch_all()])


@router.delete("/tokens/{name}")
async def revoke_token(name: str, comps: Comps, who: AdminAuth) -> TokenInfo:
    """Revoke a stored token: from this answer on it authenticates nothing."""
    token = await comps.token_store.revoke(name, revoked_by=who.name, now=comps.scheduler.clock())
    return _token_info(token)
