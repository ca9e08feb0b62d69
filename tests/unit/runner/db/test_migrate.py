"""How a database's schema revision compares with this bigtent's migrations (pure)."""

from __future__ import annotations

import pytest

from bigtent.errors import ConfigError
from bigtent.runner.db.migrate import (
    SchemaState,
    create_engine,
    display_url,
    judge_schema,
    schema_problem,
)

REVISIONS = ("0001", "0002", "0003")


@pytest.mark.parametrize(
    ("current", "state", "pending"),
    [
        (None, SchemaState.EMPTY, ("0001", "0002", "0003")),
        ("0001", SchemaState.BEHIND, ("0002", "0003")),
        ("0002", SchemaState.BEHIND, ("0003",)),
        ("0003", SchemaState.CURRENT, ()),
        ("0009", SchemaState.AHEAD, ()),
    ],
)
def test_judge_schema(current: str | None, state: SchemaState, pending: tuple[str, ...]) -> None:
    report = judge_schema(current, REVISIONS)
    assert (report.current, report.head, report.state, report.pending) == (
        current,
        "0003",
        state,
        pending,
    )


@pytest.mark.parametrize(
    ("current", "words"),
    [
        (None, ["has no bigtent schema", "bigtent db migrate --config"]),
        ("0001", ["revision 0001", "needs 0003", "bigtent db migrate --config"]),
        ("0009", ["revision 0009", "does not know", "newest is 0003"]),
    ],
)
def test_schema_problem_says_what_to_do(current: str | None, words: list[str]) -> None:
    problem = schema_problem(judge_schema(current, REVISIONS), "db://x")
    assert problem is not None and "db://x" in problem
    for word in words:
        assert word in problem


def test_a_current_schema_is_no_problem() -> None:
    assert schema_problem(judge_schema("0003", REVISIONS), "db://x") is None


def test_display_url_masks_the_password() -> None:
    shown = display_url("postgresql+asyncpg://bigtent:s3cret@db.example.org:5432/bigtent")
    assert "s3cret" not in shown
    assert shown == "postgresql+asyncpg://bigtent:***@db.example.org:5432/bigtent"


@pytest.mark.parametrize(
    "url", ["mysql://x@y/z", "postgresql://u:s3cret@h/d", "postgresql+psycopg2://u@h/d", "x"]
)
def test_unsupported_database_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match=r"database\.url") as err:
        create_engine(url)
    assert "s3cret" not in str(err.value)
