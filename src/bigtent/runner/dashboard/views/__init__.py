"""What each dashboard page shows, gathered from the database and the scheduler's memory.

Each ``load_*`` reads (never writes) and returns plain values for a template; formatting
is ``present``'s. One module per page family: ``rows`` (the rows every list shows),
``overview``, ``builds`` (every build, one build), ``steps`` (one step, search),
``agents`` (agents, SSH builders, launches).
"""

from bigtent.runner.dashboard.views.agents import (
    AgentRow,
    AgentsPage,
    LaunchRow,
    load_agents,
    load_launches,
)
from bigtent.runner.dashboard.views.builds import (
    BUILDS_PAGE,
    FILTER_MAX_CHARS,
    BuildFilters,
    BuildPage,
    BuildsPage,
    load_build,
    load_builds,
)
from bigtent.runner.dashboard.views.overview import CacheTotals, Overview, load_overview
from bigtent.runner.dashboard.views.rows import AttemptRow, BuildRow, StepRow, TookCache
from bigtent.runner.dashboard.views.steps import SearchPage, StepPage, load_step, search

__all__ = [
    "BUILDS_PAGE",
    "FILTER_MAX_CHARS",
    "AgentRow",
    "AgentsPage",
    "AttemptRow",
    "BuildFilters",
    "BuildPage",
    "BuildRow",
    "BuildsPage",
    "CacheTotals",
    "LaunchRow",
    "Overview",
    "SearchPage",
    "StepPage",
    "StepRow",
    "TookCache",
    "load_agents",
    "load_build",
    "load_builds",
    "load_launches",
    "load_overview",
    "load_step",
    "search",
]
