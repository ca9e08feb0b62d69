"""Migrations on the test database (SQLite, or PostgreSQL in that pass). 0003: failures
recorded before it are cached from when they finished; agents get a zero failure count. 0004
adds the tokens table. 0005 adds the agents' OIDC identity columns (NULL for existing rows).
0006 gives steps and agents their trust (existing ones trusted), one step per derivation and
trust, and the untrusted cache's index. 0007 adds the autoscaler's launches table. 0008 binds
token agents' machine ids to their token. All downgrade cleanly."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.exc import IntegrityError

from bigtent.runner.db.migrate import alembic_config, create_engine, schema_status
from tests.databases import MakeDatabase


def _to(conn: Connection, revision: str, *, down: bool = False) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    (command.downgrade if down else command.upgrade)(cfg, revision)


def _columns(conn: Connection, table: str) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns(table)}


async def test_0003_backfills_failed_at_and_downgrades(make_database: MakeDatabase) -> None:
    engine = create_engine(make_database(migrated=False))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_to, "0002")
            await conn.execute(
                text(
                    "INSERT INTO derivations (drv_path, name, system, required_features, "
                    "outputs, input_drvs, input_srcs) VALUES (:d, 'x', 's', '[]', '{}', '{}', '[]')"
                ),
                [{"d": f"/nix/store/{i}-x.drv"} for i in range(3)],
            )
            await conn.execute(
                text(
                    "INSERT INTO steps (drv_path, state, created_at, attempts, outcome, "
                    "finished_at) VALUES (:d, :state, 1.0, 0, :outcome, :fin)"
                ),
                [
                    {
                        "d": "/nix/store/0-x.drv",
                        "state": "failed",
                        "outcome": "build_failure",
                        "fin": 100.0,
                    },
                    {
                        "d": "/nix/store/1-x.drv",
                        "state": "failed",
                        "outcome": "agent_lost",
                        "fin": 200.0,
                    },
                    {
                        "d": "/nix/store/2-x.drv",
                        "state": "succeeded",
                        "outcome": "success",
                        "fin": 300.0,
                    },
                ],
            )
            await conn.execute(
                text(
                    "INSERT INTO agents (machine_id, name, hostname, systems, "
                    "supported_features, mandatory_features, max_jobs, speed_factor, ephemeral, "
                    "auth_kind, version, connected, first_seen, last_seen, steps_succeeded, "
                    "steps_failed, infra_failures) VALUES ('m', 'a', '', '[]', '[]', '[]', 1, "
                    "1.0, false, 'token', '', false, 1.0, 1.0, 0, 0, 0)"
                )
            )
            await conn.run_sync(_to, "head")
            rows = (
                await conn.execute(text("SELECT drv_path, failed_at FROM steps ORDER BY id"))
            ).all()
            assert [r.failed_at for r in rows] == [100.0, None, None]
            agent = (await conn.execute(text("SELECT consecutive_failures FROM agents"))).one()
            assert agent.consecutive_failures == 0
        current, head = await schema_status(engine)
        assert current == head and head is not None
        async with engine.begin() as conn:
            await conn.run_sync(_to, "0002", down=True)
            assert "failed_at" not in await conn.run_sync(_columns, "steps")
            assert "consecutive_failures" not in await conn.run_sync(_columns, "agents")
    finally:
        await engine.dispose()


async def test_0004_creates_the_tokens_table_and_downgrades(make_database: MakeDatabase) -> None:
    engine = create_engine(make_database(migrated=False))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_to, "0003")
            assert "tokens" not in await conn.run_sync(lambda c: inspect(c).get_table_names())
            await conn.run_sync(_to, "0004")
            assert await conn.run_sync(_columns, "tokens") == {
                "id",
                "name",
                "role",
                "sha256",
                "trusted",
                "created_by",
                "created_at",
                "revoked_at",
            }
            await conn.execute(
                text(
                    "INSERT INTO tokens (name, role, sha256, created_at) "
                    "VALUES ('ci', 'client', :d, 1.0)"
                ),
                {"d": "0" * 64},
            )
            row = (await conn.execute(text("SELECT trusted, created_by FROM tokens"))).one()
            assert (row.trusted, row.created_by) == (0, "")
            await conn.run_sync(_to, "0003", down=True)
            assert "tokens" not in await conn.run_sync(lambda c: inspect(c).get_table_names())
    finally:
        await engine.dispose()


_OIDC_COLUMNS = {
    "oidc_issuer",
    "oidc_repository",
    "oidc_subject",
    "oidc_workflow_ref",
    "oidc_ref",
}


async def test_0005_adds_nullable_oidc_identity_columns_and_downgrades(
    make_database: MakeDatabase,
) -> None:
    engine = create_engine(make_database(migrated=False))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_to, "0004")
            assert not _OIDC_COLUMNS & await conn.run_sync(_columns, "agents")
            await conn.execute(
                text(
                    "INSERT INTO agents (machine_id, name, hostname, systems, "
                    "supported_features, mandatory_features, max_jobs, speed_factor, ephemeral, "
                    "auth_kind, version, connected, first_seen, last_seen, steps_succeeded, "
                    "steps_failed, infra_failures) VALUES ('m', 'a', '', '[]', '[]', '[]', 1, "
                    "1.0, false, 'token', '', false, 1.0, 1.0, 0, 0, 0)"
                )
            )
            await conn.run_sync(_to, "0005")
            assert await conn.run_sync(_columns, "agents") >= _OIDC_COLUMNS
            row = (await conn.execute(text("SELECT * FROM agents"))).one()._mapping
            assert {name: row[name] for name in _OIDC_COLUMNS} == dict.fromkeys(_OIDC_COLUMNS)
            await conn.run_sync(_to, "0004", down=True)
            assert not _OIDC_COLUMNS & await conn.run_sync(_columns, "agents")
            assert (await conn.execute(text("SELECT name FROM agents"))).scalar_one() == "a"
    finally:
        await engine.dispose()


async def test_0006_scopes_steps_by_trust_and_downgrades(make_database: MakeDatabase) -> None:
    engine = create_engine(make_database(migrated=False))
    insert_step = text(
        "INSERT INTO steps (drv_path, state, created_at, attempts, trusted) "
        "VALUES ('/nix/store/0-x.drv', 'runnable', 1.0, 0, :t)"
    )
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_to, "0005")
            await conn.execute(
                text(
                    "INSERT INTO derivations (drv_path, name, system, required_features, "
                    "outputs, input_drvs, input_srcs) VALUES ('/nix/store/0-x.drv', 'x', 's', "
                    "'[]', '{}', '{}', '[]')"
                )
            )
            await conn.execute(
                text(
                    "INSERT INTO steps (drv_path, state, created_at, attempts) "
                    "VALUES ('/nix/store/0-x.drv', 'succeeded', 1.0, 0)"
                )
            )
            await conn.execute(
                text(
                    "INSERT INTO agents (machine_id, name, hostname, systems, "
                    "supported_features, mandatory_features, max_jobs, speed_factor, ephemeral, "
                    "auth_kind, version, connected, first_seen, last_seen, steps_succeeded, "
                    "steps_failed, infra_failures) VALUES ('m', 'a', '', '[]', '[]', '[]', 1, "
                    "1.0, false, 'token', '', false, 1.0, 1.0, 0, 0, 0)"
                )
            )
            await conn.run_sync(_to, "0006")
            assert (await conn.execute(text("SELECT trusted FROM steps"))).scalar_one() in (1, True)
            assert (await conn.execute(text("SELECT trusted FROM agents"))).scalar_one() in (
                1,
                True,
            )
            assert "untrusted_store_paths" in await conn.run_sync(
                lambda c: inspect(c).get_table_names()
            )
            # One derivation: a trusted and an untrusted step, never two of one trust.
            await conn.execute(insert_step, {"t": False})
        async with engine.begin() as conn:
            with pytest.raises(IntegrityError):
                await conn.execute(insert_step, {"t": True})
        async with engine.begin() as conn:
            await conn.run_sync(_to, "0005", down=True)
            assert "trusted" not in await conn.run_sync(_columns, "steps")
            assert "trusted" not in await conn.run_sync(_columns, "agents")
            assert "untrusted_store_paths" not in await conn.run_sync(
                lambda c: inspect(c).get_table_names()
            )
            # The untrusted step went; the trusted one stayed.
            rows = (await conn.execute(text("SELECT state FROM steps"))).all()
            assert [r.state for r in rows] == ["succeeded"]
    finally:
        await engine.dispose()


async def test_0007_creates_the_launches_table_and_downgrades(make_database: MakeDatabase) -> None:
    engine = create_engine(make_database(migrated=False))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_to, "0007")
            assert await conn.run_sync(_columns, "launches") == {
                "launch_id",
                "pool",
                "state",
                "created_at",
                "updated_at",
                "agent_machine_id",
                "agent_name",
                "error",
                "retry_at",
            }
            await conn.execute(
                text(
                    "INSERT INTO launches (launch_id, pool, state, created_at, updated_at) "
                    "VALUES ('L1', 'gha', 'pending', 1.0, 1.0)"
                )
            )
            await conn.run_sync(_to, "0006", down=True)
            assert "launches" not in await conn.run_sync(lambda c: inspect(c).get_table_names())
    finally:
        await engine.dispose()


async def test_every_revision_upgrades_and_downgrades_in_turn(make_database: MakeDatabase) -> None:
    """Each migration, one at a time, up from nothing and back down to nothing, then up to
    the head again: what a new revision must keep working on both databases."""
    engine = create_engine(make_database(migrated=False))
    revisions = [
        r.revision
        for r in reversed(list(ScriptDirectory.from_config(alembic_config()).walk_revisions()))
    ]
    try:
        async with engine.begin() as conn:
            for revision in revisions:
                await conn.run_sync(_to, revision)
            assert "steps" in await conn.run_sync(lambda c: inspect(c).get_table_names())
            for revision in reversed(["base", *revisions[:-1]]):
                await conn.run_sync(_to, revision, down=True)
            tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
            assert set(tables) <= {"alembic_version"}
            await conn.run_sync(_to, "head")
        assert await schema_status(engine) == (revisions[-1], revisions[-1])
    finally:
        await engine.dispose()


async def test_0015_counts_every_cached_path_as_used_at_the_upgrade(
    make_database: MakeDatabase,
) -> None:
    """Uses were not recorded before 0015: an upgraded cache must not look idle since each
    path's publication (retention would delete an old cache's paths at its first run)."""
    import time

    engine = create_engine(make_database(migrated=False))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_to, "0014")
            for table in ("store_paths", "untrusted_store_paths"):
                await conn.execute(
                    text(
                        f"INSERT INTO {table} (path, hash_part, nar_hash, nar_size, url, "
                        'compression, file_hash, file_size, "references", sig, created_at) '
                        "VALUES (:p, :h, 'sha256:x', 1, 'nar/x.nar', 'none', 'sha256:x', 1, "
                        "'[]', 'k:s', 1.0)"
                    ),
                    {"p": "/nix/store/" + "a" * 32 + "-old", "h": "a" * 32},
                )
            before = time.time()
            await conn.run_sync(_to, "0015")
            for table in ("store_paths", "untrusted_store_paths"):
                used = (await conn.execute(text(f"SELECT last_used_at FROM {table}"))).scalar()
                assert used is not None and used >= before - 1
            await conn.run_sync(_to, "0014", down=True)
            assert "last_used_at" not in await conn.run_sync(_columns, "store_paths")
    finally:
        await engine.dispose()
