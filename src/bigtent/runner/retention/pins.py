"""Named pins: each keeps the closures of its paths in the cache (``bigtent pin``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.errors import BadRequest, NotFound
from bigtent.nix.store_path import StorePath
from bigtent.runner.db import queries
from bigtent.runner.db.tables import store_paths, untrusted_store_paths

PIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
MAX_PIN_PATHS = 10_000
DAY = 86400.0


def check_pin(name: str, paths: Sequence[str], keep_days: float | None) -> tuple[str, ...]:
    """The pin's paths, sorted and unique; BadRequest for a bad name, path or keep."""
    if not PIN_NAME.fullmatch(name):
        raise BadRequest(
            f"bad pin name {name!r}: 1-128 letters, digits and ._@+- (starting with a letter "
            "or digit)"
        )
    if not paths:
        raise BadRequest("a pin needs at least one store path")
    if len(paths) > MAX_PIN_PATHS:
        raise BadRequest(f"a pin holds at most {MAX_PIN_PATHS} paths")
    for path in paths:
        try:
            StorePath.parse(path)
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
    if keep_days is not None and not 0 < keep_days <= 100 * 365:
        raise BadRequest("keep_days must be more than 0 and at most 36500")
    return tuple(sorted(set(paths)))


def live(pins: Sequence[queries.Pin], now: float) -> list[queries.Pin]:
    """Pins not expired at ``now``."""
    return [p for p in pins if p.expires_at is None or p.expires_at > now]


@dataclass(frozen=True, slots=True)
class PinAnswer:
    pin: queries.Pin
    missing: tuple[str, ...]
    """Pinned paths neither cache holds (yet): kept once they are there."""


class Pins:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def add(
        self, name: str, paths: Sequence[str], keep_days: float | None, *, by: str, now: float
    ) -> PinAnswer:
        wanted = check_pin(name, paths, keep_days)
        pin = queries.Pin(
            name, wanted, now, by, None if keep_days is None else now + keep_days * DAY
        )
        async with self.engine.begin() as conn:
            await queries.upsert_pin(conn, pin)
            present = await queries.present_store_paths(conn, wanted, store_paths)
            present |= await queries.present_store_paths(conn, wanted, untrusted_store_paths)
        return PinAnswer(pin, tuple(p for p in wanted if p not in present))

    async def list(self, now: float) -> list[queries.Pin]:
        async with self.engine.connect() as conn:
            return live(await queries.fetch_pins(conn), now)

    async def remove(self, name: str) -> None:
        async with self.engine.begin() as conn:
            if not await queries.delete_pin(conn, name):
                raise NotFound(f"no pin {name!r}")


def pin_json(pin: queries.Pin) -> dict[str, object]:
    return {
        "name": pin.name,
        "paths": list(pin.paths),
        "created_at": pin.created_at,
        "created_by": pin.created_by,
        "expires_at": pin.expires_at,
    }
