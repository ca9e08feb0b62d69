"""``bigtent up``'s pure helpers for waiting on its agents."""

from __future__ import annotations

from bigtent.up.children import agent_error, pending_agents, schema_line


def test_agent_error_is_the_last_error_and_what_follows() -> None:
    log = (
        "--- bigtent up: starting agent local-1 ---\n"
        "2026-12-06 INFO bigtent.agent: starting\n"
        "Error: an older error\n"
        "2026-12-06 INFO bigtent.agent: starting again\n"
        "Error: this agent cannot build (start-up probe): error: the group 'nixbld' ...\n"
        "hint: run scripts/install-deps.sh\n"
    )
    assert agent_error(log) == (
        "Error: this agent cannot build (start-up probe): error: the group 'nixbld' ...\n"
        "hint: run scripts/install-deps.sh"
    )


def test_agent_error_without_an_error_line_is_the_tail() -> None:
    log = "".join(f"line {i}\n" for i in range(30))
    assert agent_error(log, lines=3) == "line 27\nline 28\nline 29"
    assert agent_error("") == ""


def test_pending_agents_keeps_order() -> None:
    assert pending_agents(["local-1", "local-2", "local-3"], {"local-2"}) == ["local-1", "local-3"]
    assert pending_agents(["local-1"], {"local-1", "other"}) == []


def test_schema_line_says_created_or_upgraded() -> None:
    assert schema_line(None, "0011") == "database created (schema 0011)"
    assert schema_line("0009", "0011") == "database schema upgraded from 0009 to 0011"
