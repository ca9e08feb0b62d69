"""The CI projects: the configured ``[[projects]]`` and those added through the API, as the
database holds them (every runner on a database sees the same projects)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.config.ci import ProjectSection, api_project_problem
from bigtent.errors import BadRequest, ConfigError, Conflict, NotFound
from bigtent.runner.db import ci_queries as q

log = logging.getLogger(__name__)


class Projects:
    """The projects this runner builds (``by_name``) and where each came from
    (``sources``: ``config`` or ``api``), read again from the database on ``reload``."""

    def __init__(
        self, engine: AsyncEngine, api_secrets_dir: Path | None, clock: Callable[[], float]
    ) -> None:
        self.engine = engine
        self.api_secrets_dir = api_secrets_dir
        self.clock = clock
        self.by_name: dict[str, ProjectSection] = {}
        self.sources: dict[str, str] = {}
        self.reloaded = time.monotonic()

    @staticmethod
    def check_names(configured: list[ProjectSection]) -> None:
        names = [p.name for p in configured]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"[[projects]] names repeat: {', '.join(sorted(dup))}")

    async def write_configured(self, conn: Any, configured: list[ProjectSection]) -> None:
        """The configured projects into the database (they win over stored ones of the same
        name)."""
        now = self.clock()
        for p in configured:
            await q.upsert_project(conn, p.name, "config", p.model_dump(mode="json"), now)

    def set_rows(self, rows: list[Any]) -> None:
        self.by_name = {}
        self.sources = {}
        for row in rows:
            try:
                project = ProjectSection.model_validate_json(row.settings)
            except ValueError as exc:
                log.error("project %s in the database is invalid, skipped: %s", row.name, exc)
                continue
            problem = (
                api_project_problem(project, self.api_secrets_dir)
                if row.source != "config"
                else None
            )
            if problem is not None:
                log.error("project %s (added through the API) skipped: %s", row.name, problem)
                continue
            self.by_name[row.name] = project
            self.sources[row.name] = row.source

    async def reload(self) -> None:
        async with self.engine.connect() as conn:
            self.set_rows(await q.fetch_projects(conn))
        self.reloaded = time.monotonic()

    async def add(self, project: ProjectSection) -> None:
        problem = api_project_problem(project, self.api_secrets_dir)
        if problem is not None:
            raise BadRequest(f"invalid project: {problem}")
        async with self.engine.begin() as conn:
            added = await q.insert_project(
                conn, project.name, "api", project.model_dump(mode="json"), self.clock()
            )
        if not added:
            raise Conflict(f"project {project.name} exists already")
        await self.reload()

    async def remove(self, name: str) -> None:
        await self.reload()
        if name not in self.by_name:
            raise NotFound(f"no project {name}")
        if self.sources.get(name) == "config":
            raise Conflict(
                f"project {name} is defined in the runner's config: remove it from [[projects]]"
            )
        async with self.engine.begin() as conn:
            await q.delete_project(conn, name)
        await self.reload()

    def get(self, name: str) -> ProjectSection:
        p = self.by_name.get(name)
        if p is None:
            raise NotFound(f"no project {name}")
        return p
