"""The start-up probe's pure parts: the probe expression and the hint chosen from Nix's error."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from bigtent.agent.probe import (
    HINTS,
    ProbeCause,
    may_retry,
    probe_cause,
    probe_expression,
    probe_failure,
    probe_hint,
    run_probe,
)
from bigtent.errors import AgentCannotBuild
from bigtent.nix.store import NixStore, RealiseResult, RealiseStatus


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
    # Only a failure no known cause explains may be passing: tried once more.
    assert may_retry(error) is (cause is ProbeCause.OTHER)


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


class _FakeStore(NixStore):
    """Answers the probe's Nix calls from a list of realise results (no Nix)."""

    def __init__(self, results: list[RealiseResult]) -> None:
        super().__init__()
        self.results = results
        self.nonces: list[str] = []
        self.deleted: list[str] = []

    async def instantiate(
        self, file: str | None, attrs: Sequence[str] = (), *, expr: str | None = None
    ) -> list[str]:
        assert expr is not None
        self.nonces.append(expr.split('nonce = "')[1].split('"')[0])
        return [f"/nix/store/{len(self.nonces)}-bigtent-probe.drv"]

    async def realise(self, paths: Sequence[str], **kw: Any) -> RealiseResult:
        return self.results.pop(0)

    async def delete(self, paths: Sequence[str]) -> None:
        self.deleted += paths


KILLED = "error: builder for '/nix/store/x-bigtent-probe.drv' failed due to signal 9 (Killed)"
NO_GROUP = "error: the group 'nixbld' specified in 'build-users-group' does not exist"


async def test_a_passing_failure_is_tried_once_more_with_a_new_nonce() -> None:
    store = _FakeStore(
        [
            RealiseResult(RealiseStatus.BUILD_FAILURE, 100, error=KILLED),
            RealiseResult(RealiseStatus.SUCCESS, 0, output_paths=["/nix/store/o-bigtent-probe"]),
        ]
    )
    assert await run_probe(store, nonce="first") > 0
    assert store.nonces[0] == "first" and len(set(store.nonces)) == 2
    assert store.deleted == [
        "/nix/store/1-bigtent-probe.drv",
        "/nix/store/o-bigtent-probe",
        "/nix/store/2-bigtent-probe.drv",
    ]


async def test_a_known_cause_fails_at_once_and_a_second_failure_fails() -> None:
    store = _FakeStore([RealiseResult(RealiseStatus.OTHER_FAILURE, 1, error=NO_GROUP)])
    with pytest.raises(AgentCannotBuild, match="build-users-group"):
        await run_probe(store)
    assert len(store.nonces) == 1
    store = _FakeStore([RealiseResult(RealiseStatus.BUILD_FAILURE, 100, error=KILLED)] * 2)
    with pytest.raises(AgentCannotBuild, match="signal 9"):
        await run_probe(store)
    assert len(store.nonces) == 2
