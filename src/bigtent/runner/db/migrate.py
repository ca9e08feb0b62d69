"""Database engine creation, schema checks and migrations (alembic, run in-process).

The runner never changes the schema by itself: it checks it at start and refuses a database
whose schema is missing, older or newer than its own (``check_schema``). ``bigtent db
migrate`` (``migrate``) upgrades it; ``bigtent up`` migrates its own embedded database.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import asyncpg.exceptions
import sqlalchemy.exc
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, make_url, text
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bigtent.errors import ConfigError, DatabaseError, SchemaMismatch
from bigtent.runner.db import inlinesqlite
from bigtent.runner.db.inlinesqlite import BUSY_TIMEOUT_SECS
from bigtent.runner.db.sqlitewrites import take_turns

log = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATE_LOCK = 0x62696774656E74
"""PostgreSQL advisory lock key held while migrating ("bigtent"): two ``bigtent db migrate``
at once run one after the other."""


def alembic_config(url: str = "") -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    if url:
        cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def display_url(url: str) -> str:
    """The URL with its password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable database URL>"


def create_engine(url: str) -> AsyncEngine:
    """An async engine for ``url``; SQLite gets WAL, foreign keys, a busy timeout, its
    statements run on the event loop's thread (``inlinesqlite``; a URL with query options or
    an in-memory database keeps aiosqlite's thread), and its writers take turns in the
    process (``sqlitewrites``)."""
    if url.startswith("sqlite"):
        parsed = make_url(url)
        path = parsed.database or ""
        if path and path != ":memory:" and not parsed.query:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_async_engine(url, async_creator=inlinesqlite.connector(path))
        else:
            engine = create_async_engine(url, connect_args={"timeout": BUSY_TIMEOUT_SECS})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: object, _record: object) -> None:
            cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        take_turns(engine)
        return engine
    if url.startswith("postgresql+asyncpg"):
        try:
            return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
        except ArgumentError as exc:
            raise ConfigError(f"config key database.url: {exc}") from exc
    raise ConfigError(
        f"config key database.url: unsupported database URL {display_url(url)!r} (use "
        "sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB)"
    )


# ---- the schema's state (pure) ---------------------------------------------------------------
class SchemaState(StrEnum):
    """How a database's schema compares with this bigtent's migrations."""

    CURRENT = "current"
    """At this bigtent's newest revision."""
    BEHIND = "behind"
    """At an older revision: ``bigtent db migrate`` upgrades it."""
    EMPTY = "empty"
    """No bigtent schema at all (a new database): ``bigtent db migrate`` creates it."""
    AHEAD = "ahead"
    """At a revision this bigtent does not know: a newer bigtent migrated it."""


@dataclass(frozen=True, slots=True)
class SchemaReport:
    current: str | None
    head: str
    state: SchemaState
    pending: tuple[str, ...]
    """Revisions ``bigtent db migrate`` would apply, oldest first."""


def judge_schema(current: str | None, revisions: Sequence[str]) -> SchemaReport:
    """Compare the database's revision with the known ones (oldest first; the last is the
    head)."""
    head = revisions[-1]
    if current is None:
        return SchemaReport(None, head, SchemaState.EMPTY, tuple(revisions))
    if current not in revisions:
        return SchemaReport(current, head, SchemaState.AHEAD, ())
    pending = tuple(revisions[revisions.index(current) + 1 :])
    return SchemaReport(
        current, head, SchemaState.BEHIND if pending else SchemaState.CURRENT, pending
    )


def schema_problem(report: SchemaReport, where: str) -> str | None:
    """Why a runner must not start on this schema (None: it may), with what to do."""
    match report.state:
        case SchemaState.CURRENT:
            return None
        case SchemaState.EMPTY:
            return (
                f"the database {where} has no bigtent schema yet: create it with "
                "`bigtent db migrate --config RUNNER.toml`"
            )
        case SchemaState.BEHIND:
            return (
                f"the database {where} is at schema revision {report.current}, this bigtent "
                f"needs {report.head}: upgrade it with `bigtent db migrate --config "
                "RUNNER.toml` (stop the other runners first)"
            )
        case SchemaState.AHEAD:
            return (
                f"the database {where} is at schema revision {report.current}, which this "
                f"bigtent does not know (its newest is {report.head}): a newer bigtent "
                "migrated it; run that version"
            )


# ---- the database ------------------------------------------------------------------------------
def _revisions() -> list[str]:
    script = ScriptDirectory.from_config(alembic_config())
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def _head() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _where(engine: AsyncEngine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _reason(exc: BaseException) -> str:
    """The driver's own words (first line), without SQLAlchemy's wrapping."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _unreachable(engine: AsyncEngine, exc: BaseException) -> DatabaseError:
    return DatabaseError(f"cannot use the database {_where(engine)}: {_reason(exc)}")


async def schema_status(engine: AsyncEngine) -> tuple[str | None, str | None]:
    """(current revision, head revision)."""
    async with engine.connect() as conn:
        current = await conn.run_sync(_current)
    return current, _head()


async def inspect_schema(engine: AsyncEngine) -> SchemaReport:
    """Where the database's schema stands; DatabaseError when it cannot be reached."""
    try:
        async with engine.connect() as conn:
            current = await conn.run_sync(_current)
    except (OSError, SQLAlchemyError) as exc:
        raise _unreachable(engine, exc) from exc
    return judge_schema(current, _revisions())


async def check_schema(engine: AsyncEngine) -> SchemaReport:
    """The runner's start check: SchemaMismatch unless the schema is this bigtent's."""
    report = await inspect_schema(engine)
    problem = schema_problem(report, _where(engine))
    if problem is not None:
        raise SchemaMismatch(problem, detail={"current": report.current, "head": report.head})
    return report


async def migrate(engine: AsyncEngine) -> tuple[str | None, str]:
    """Upgrade the schema to the newest revision, in one transaction; returns (before,
    after). A schema newer than this bigtent is refused, never downgraded. On PostgreSQL an
    advisory lock makes concurrent migrations wait for each other."""

    def _upgrade(conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")

    revisions = _revisions()
    try:
        conn = await engine.connect()
    except (OSError, SQLAlchemyError) as exc:
        raise _unreachable(engine, exc) from exc
    try:
        async with conn.begin():
            if conn.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATE_LOCK})
            before = await conn.run_sync(_current)
            report = judge_schema(before, revisions)
            problem = schema_problem(report, _where(engine))
            if report.state is SchemaState.AHEAD and problem is not None:
                raise SchemaMismatch(problem, detail={"current": before, "head": report.head})
            if report.pending:
                await conn.run_sync(_upgrade)
            after = await conn.run_sync(_current)
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"migrating the database {_where(engine)} failed: {_reason(exc)}"
        ) from exc
    finally:
        await conn.close()
    after = after or report.head
    if before is None:
        log.debug("database schema created at %s", after)
    elif before != after:
        log.debug("database schema migrated from %s to %s", before, after)
    return before, after


async def migrate_database(url: str) -> tuple[str | None, str]:
    """``migrate`` the database at ``url`` (an engine of its own, disposed afterwards)."""
    engine = create_engine(url)
    try:
        return await migrate(engine)
    finally:
        await engine.dispose()


async def inspect_database(url: str) -> SchemaReport:
    """``inspect_schema`` of the database at ``url``."""
    engine = create_engine(url)
    try:
        return await inspect_schema(engine)
    finally:
        await engine.dispose()


DATABASE_ERRORS: tuple[type[Exception], ...] = (
    sqlalchemy.exc.DBAPIError,
    sqlalchemy.exc.TimeoutError,
    # Opening a connection raises the driver's own errors unwrapped: refused, reset, or the
    # server starting up or shutting down.
    ConnectionError,
    asyncpg.exceptions.PostgresError,
    asyncpg.exceptions.InterfaceError,
)
"""What a database that cannot be used now raises (``database_unavailable`` tells which)."""


def _lost_connection(exc: BaseException | None) -> bool:
    """Whether the driver's error under a wrapped one is a lost or refused connection or the
    server shutting down (SQLAlchemy wraps some of those as a plain ``DBAPIError``)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(
            exc,
            ConnectionError
            | asyncpg.exceptions.OperatorInterventionError
            | asyncpg.exceptions.PostgresConnectionError
            | asyncpg.exceptions.InterfaceError,
        ):
            return True
        exc = exc.__cause__
        seen += 1
    return False


def database_unavailable(exc: BaseException) -> DatabaseError | None:
    """The 503 for a database that cannot be used now (connection refused or lost, the
    server starting up or shutting down, a pool timeout), or None for any other error (a
    bug: a constraint violated, bad SQL)."""
    if isinstance(exc, sqlalchemy.exc.TimeoutError):
        return DatabaseError("the database is unavailable: no connection free in time")
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        if not (
            exc.connection_invalidated
            or isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError)
            or _lost_connection(exc.orig)
        ):
            return None
        cause: BaseException = exc.orig if exc.orig is not None else exc
    elif isinstance(
        exc, ConnectionError | asyncpg.exceptions.PostgresError | asyncpg.exceptions.InterfaceError
    ):
        cause = exc
    else:
        return None
    text = str(cause).strip()
    first = text.splitlines()[0][:200] if text else type(cause).__name__
    return DatabaseError(f"the database is unavailable: {first}")
