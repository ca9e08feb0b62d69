"""The start-up probe's pure parts: the probe expression and the hint chosen from Nix's error."""

from __future__ import annotations

import pytest

from bigtent.agent.probe import (
    HINTS,
    ProbeCause,
    probe_cause,
    probe_expression,
    probe_failure,
    probe_hint,
)
from bigtent.errors import AgentCannotBuild


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (
            "error: the group 'nixbld' specified in 'build-users-group' does not exist",
            ProbeCause.BUILD_USERS,
        ),
        ("error: the build users group 'nixbld' has no members", ProbeCause.BUILD_USERS),
        ("error: cloning builder process: Operation not permitted", ProbeCause.SANDBOX),
        ("error: setting up a private mount namespace: Invalid argument", ProbeCause.SANDBOX),
        ("error: unable to bind mount '/bin' to '/tmp/x/bin'", ProbeCause.SANDBOX),
        (
            "error: while setting up the build environment: getting attributes of path "
            "'/usr/lib64': No such file or directory",
            ProbeCause.SANDBOX,
        ),
        (
            "error: creating directory '/nix/store/.links': Permission denied",
            ProbeCause.STORE_NOT_WRITABLE,
        ),
        (
            "error: opening lock file '/nix/var/nix/db/big-lock': Read-only file system",
            ProbeCause.STORE_NOT_WRITABLE,
        ),
        ("error: writing to file: No space left on device", ProbeCause.STORE_NOT_WRITABLE),
        ("nix-instantiate not found: is Nix installed and on PATH?", ProbeCause.NIX_MISSING),
        ("error: unexpected end-of-file", ProbeCause.OTHER),
        ("", ProbeCause.OTHER),
    ],
)
def test_probe_cause_and_hint(error: str, cause: ProbeCause) -> None:
    assert probe_cause(error) is cause
    assert probe_hint(error) == HINTS[cause]


def test_every_cause_has_a_one_line_hint() -> None:
    assert set(HINTS) == set(ProbeCause)
    assert all(hint and "\n" not in hint for hint in HINTS.values())
    assert "scripts/install-deps.sh" in HINTS[ProbeCause.BUILD_USERS]


def test_probe_failure_carries_error_hint_and_exit_code() -> None:
    err = probe_failure("error: the group 'x' specified in 'build-users-group' does not exist")
    assert isinstance(err, AgentCannotBuild)
    assert err.exit_code == 6
    first, second = err.message.split("\n")
    assert first.endswith("error: the group 'x' specified in 'build-users-group' does not exist")
    assert second == "hint: " + HINTS[ProbeCause.BUILD_USERS]
    assert err.detail == {"cause": "build_users", "error": err.detail["error"]}


def test_probe_failure_without_text_still_says_something() -> None:
    assert "without an error message" in probe_failure("  ").message


def test_probe_expression_uses_a_builtin_builder_and_the_nonce() -> None:
    expr = probe_expression("abc123")
    assert 'builder = "builtin:buildenv"' in expr
    assert 'nonce = "abc123"' in expr
    assert "/bin/sh" not in expr
    with pytest.raises(ValueError):
        probe_expression('x"; builder = "/bin/sh')
