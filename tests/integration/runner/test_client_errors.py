"""The client shows the runner's own reasons: a malformed request's ``detail`` and an
authentication refusal, answered by the real runner app (over ASGI)."""

from __future__ import annotations

import httpx
import pytest

from bigtent.client.api import RunnerClient
from bigtent.config import Role
from bigtent.errors import AuthError, UsageError
from tests.integration.runner.conftest import MakeRunner, RunnerHarness


def _client(runner: RunnerHarness, token: str | None, source: str | None = None) -> RunnerClient:
    return RunnerClient(
        "http://runner.test",
        token=token,
        transport=httpx.ASGITransport(app=runner.app),
        token_source=source,
    )


async def test_a_refused_build_shows_the_runner_s_reasons(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    async with _client(runner, runner.tokens[Role.CLIENT]) as client:
        with pytest.raises(UsageError) as info:
            await client.create_build(
                ["/nix/store/" + "a" * 32 + "-x.drv"], priority=5000, ref="refs/heads/a b"
            )
    assert info.value.exit_code == 2
    assert info.value.message.startswith("invalid request: ")
    assert "priority: Input should be less than or equal to 1000" in info.value.message
    assert "ref: String should match pattern" in info.value.message


async def test_a_refused_token_names_the_runner_and_where_the_token_came_from(
    make_runner: MakeRunner,
) -> None:
    runner = await make_runner()
    async with _client(runner, "bt_wrong", "BIGTENT_TOKEN") as client:
        with pytest.raises(AuthError) as info:
            await client.fetch_builds()
    assert info.value.exit_code == 3
    assert info.value.message == (
        "the runner at http://runner.test refused the token from BIGTENT_TOKEN (invalid "
        "token): give a valid token in BIGTENT_TOKEN or with --token-file FILE"
    )
    async with _client(runner, None) as client:
        with pytest.raises(AuthError, match="needs a client token \\(missing bearer token\\)"):
            await client.fetch_builds()
