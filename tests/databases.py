"""The database every test runs against: SQLite by default, PostgreSQL with
``BIGTENT_TEST_DB=postgresql`` (``make test`` runs the suite once each way in CI).

Fixtures (a pytest plugin, registered in ``tests/conftest.py``):

- ``make_database(migrated=True)``: an empty database for this test alone, its schema at this
  bigtent's newest revision (or no schema at all with ``migrated=False``); returns its URL.
  SQLite: a copy of a migrated template file under the test's ``tmp_path``. PostgreSQL: a
  database in the worker's throwaway cluster (``tests/pgcluster.py``), first copied from a
  migrated template; after the test its connections are closed and its tables emptied
  (sequences restarted), and the next test gets it again — ``CREATE DATABASE`` costs several
  times more on a busy machine. One whose schema a test changed is dropped instead.
- ``database_url``: ``make_database()`` once.

Tests that need PostgreSQL itself (several runners on one database, LISTEN/NOTIFY) are marked
``needs_postgresql``: they run in the PostgreSQL pass only.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bigtent.runner.db.migrate import migrate_database
from tests.pgcluster import PgCluster, find_bin_dir

TEST_DB = os.environ.get("BIGTENT_TEST_DB", "sqlite").strip().lower() or "sqlite"
"""Read once at import: ``clean_environ`` clears ``BIGTENT_*`` before every test."""
if TEST_DB not in ("sqlite", "postgresql"):
    raise pytest.UsageError(f"BIGTENT_TEST_DB must be sqlite or postgresql (got {TEST_DB!r})")
ON_POSTGRESQL = TEST_DB == "postgresql"

needs_postgresql = pytest.mark.skipif(
    not ON_POSTGRESQL, reason="runs in the PostgreSQL pass (BIGTENT_TEST_DB=postgresql)"
)

MakeDatabase = Callable[..., str]


def migrate_url(url: str) -> None:
    """Create the schema of the database at ``url`` (in a thread: a test's event loop may be
    running)."""

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, migrate_database(url)).result()


_RESET = """
DO $$
DECLARE tables text;
BEGIN
  PERFORM pg_terminate_backend(pid) FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid();
  SELECT string_agg(format('%I', tablename), ', ') INTO tables FROM pg_tables
    WHERE schemaname = 'public' AND tablename <> 'alembic_version';
  IF tables IS NOT NULL THEN
    EXECUTE 'TRUNCATE ' || tables || ' RESTART IDENTITY CASCADE';
  END IF;
END $$;
SELECT version_num FROM alembic_version;
"""
"""Close every other connection, empty every table, and say the schema's revision."""


def url_db(url: str) -> str:
    """The database name of a URL."""
    return url.rsplit("/", 1)[1]


class _Templates:
    """Per worker: where new databases come from."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cluster: PgCluster | None = None
        self._template: str | Path | None = None
        self._head = ""
        self._free: list[str] = []
        """PostgreSQL databases at the head revision, emptied, ready for the next test."""

    def start_cluster(self) -> PgCluster:
        if self.cluster is None:
            bin_dir = find_bin_dir()
            if bin_dir is None:
                raise RuntimeError(
                    "BIGTENT_TEST_DB=postgresql but no PostgreSQL server is installed "
                    "(apt-get install postgresql)"
                )
            cluster = PgCluster(bin_dir)
            try:
                cluster.start()
            except BaseException:
                cluster.stop()
                raise
            self.cluster = cluster
        return self.cluster

    def new(self, tmp_path: Path, migrated: bool) -> tuple[str, Callable[[], None]]:
        """A new database's URL and how to get rid of it."""
        if ON_POSTGRESQL:
            cluster = self.start_cluster()
            if not migrated:
                name = f"t_{uuid.uuid4().hex[:16]}"
                url = cluster.create_database(name)
                return url, lambda: cluster.drop_database(name)
            if self._template is None:
                url = cluster.create_database("bigtent_template")
                migrate_url(url)
                self._head = cluster.sql("SELECT version_num FROM alembic_version", url_db(url))
                self._template = "bigtent_template"
            if self._free:
                name = self._free.pop()
            else:
                name = f"t_{uuid.uuid4().hex[:16]}"
                cluster.create_database(name, template=str(self._template))
            return cluster.url(name), lambda: self._recycle(cluster, name)
        path = tmp_path / f"db-{uuid.uuid4().hex[:8]}.sqlite"
        if migrated:
            if self._template is None:
                template = self.root / "template.sqlite"
                migrate_url(f"sqlite+aiosqlite:///{template}")
                self._template = template
            shutil.copyfile(self._template, path)
        return f"sqlite+aiosqlite:///{path}", lambda: None

    def _recycle(self, cluster: PgCluster, name: str) -> None:
        try:
            revision = cluster.sql(_RESET, name)
        except RuntimeError:
            revision = ""
        if revision.strip() == self._head.strip():
            self._free.append(name)
        else:
            cluster.drop_database(name)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


@pytest.fixture(scope="session")
def _database_templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Templates]:
    templates = _Templates(tmp_path_factory.mktemp("database-templates"))
    yield templates
    templates.close()


@pytest.fixture
def make_database(_database_templates: _Templates, tmp_path: Path) -> Iterator[MakeDatabase]:
    drops: list[Callable[[], None]] = []

    def make(*, migrated: bool = True) -> str:
        url, drop = _database_templates.new(tmp_path, migrated)
        drops.append(drop)
        return url

    yield make
    for drop in drops:
        drop()


@pytest.fixture
def database_url(make_database: MakeDatabase) -> str:
    return make_database()
