"""``--oidc github`` against a loopback stand-in for GitHub Actions' ID token service, which
mints real RS256 tokens with the loopback OIDC issuer's key: the request carries the audience
and the request token, the answer passes the runner's own ``OidcVerifier``, a fresh token is
fetched per connect and reused by uploads until near expiry, and no token reaches a log."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from bigtent.agent.credentials import GithubActionsToken, github_actions_token, token_times
from bigtent.config import OidcIssuerSection
from bigtent.errors import CredentialUnavailable
from bigtent.runner.auth.oidc import OidcVerifier
from tests.github_actions import REPOSITORY, SUBJECT, ActionsTokenEndpoint, running_endpoint
from tests.integration.runner.oidc_issuer import (
    LocalIssuer,
    SigningKey,
    TlsFiles,
    make_tls,
    running_issuer,
)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("gh-oidc-tls"))


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate("gh-key")


@pytest.fixture
def issuer(tls: TlsFiles, key: SigningKey) -> Iterator[LocalIssuer]:
    yield from running_issuer(tls, [key])


@pytest.fixture
def endpoint(issuer: LocalIssuer, key: SigningKey) -> Iterator[ActionsTokenEndpoint]:
    yield from running_endpoint(issuer, key)


def source(
    endpoint: ActionsTokenEndpoint, clock: Callable[[], float] = time.time
) -> GithubActionsToken:
    return github_actions_token(
        endpoint.env(), "bigtent", retry_delays_secs=(0.0, 0.0), clock=clock
    )


async def test_the_fetched_token_is_one_the_runner_accepts(
    endpoint: ActionsTokenEndpoint, issuer: LocalIssuer, tls: TlsFiles
) -> None:
    token = await source(endpoint).credential(fresh=True)
    assert token is not None and endpoint.issued == [token]
    assert endpoint.audiences == ["bigtent"]
    assert endpoint.state.refused == 0  # the bearer header matched
    rule = OidcIssuerSection(
        issuer=issuer.url, audiences=["bigtent"], ca_file=tls.ca_file, repositories=[REPOSITORY]
    )
    async with OidcVerifier([rule]) as verifier:
        identity = await verifier.verify(token)
    assert (identity.repository, identity.subject) == (REPOSITORY, SUBJECT)


async def test_fresh_per_connect_reused_by_uploads_until_near_expiry(
    endpoint: ActionsTokenEndpoint,
) -> None:
    now = [0.0]
    src = source(endpoint, clock=lambda: now[0])
    first = await src.credential(fresh=True)
    assert first is not None
    assert endpoint.requests == 1
    # An upload right after: the token has ~300 s left, it is reused.
    exp = token_times(first).expires_at
    assert exp is not None
    now[0] = exp - 200
    assert await src.credential(fresh=False) == first
    assert endpoint.requests == 1
    # Within two minutes of exp an upload gets a new one.
    now[0] = exp - 100
    second = await src.credential(fresh=False)
    assert endpoint.requests == 2 and second == endpoint.issued[-1]
    # A (re)connect always asks again.
    await src.credential(fresh=True)
    assert endpoint.requests == 3


async def test_a_wrong_request_token_is_a_clear_error(endpoint: ActionsTokenEndpoint) -> None:
    env = endpoint.env() | {"ACTIONS_ID_TOKEN_REQUEST_TOKEN": "not-the-one"}
    src = github_actions_token(env, "bigtent")
    with pytest.raises(CredentialUnavailable) as caught:
        await src.credential(fresh=True)
    assert "HTTP 401" in caught.value.message
    assert "permissions: id-token: write" in caught.value.message
    assert endpoint.requests == 1  # a 401 is not tried again
    assert "not-the-one" not in caught.value.message


async def test_a_503_is_tried_again(endpoint: ActionsTokenEndpoint) -> None:
    endpoint.fail_next(503, 503)
    assert await source(endpoint).credential(fresh=True) == endpoint.issued[0]
    assert endpoint.requests == 3
    endpoint.fail_next(503, 503, 503)
    with pytest.raises(CredentialUnavailable, match=r"HTTP 503.*gave up after 3 tries"):
        await source(endpoint).credential(fresh=True)


async def test_a_silent_endpoint_times_out(endpoint: ActionsTokenEndpoint) -> None:
    with socket.socket() as quiet:  # accepts connections (backlog) and never answers
        quiet.bind(("127.0.0.1", 0))
        quiet.listen(8)
        env = endpoint.env() | {
            "ACTIONS_ID_TOKEN_REQUEST_URL": f"http://127.0.0.1:{quiet.getsockname()[1]}/t?v=1"
        }
        src = github_actions_token(env, "bigtent", retry_delays_secs=(), timeout_secs=0.3)
        with pytest.raises(CredentialUnavailable, match=r"timed out after 0\.3 s"):
            await src.credential(fresh=True)


async def test_no_token_reaches_the_log(
    endpoint: ActionsTokenEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):  # httpx and httpcore debug lines included
        src = source(endpoint)
        await src.credential(fresh=True)
        await src.credential(fresh=True)
    assert len(endpoint.issued) == 2
    assert "got a GitHub Actions ID token for audience 'bigtent'" in caplog.text
    for secret in (*endpoint.issued, endpoint.request_token):
        assert secret not in caplog.text
        for part in secret.split(".")[1:]:  # nor a recognisable piece of a JWT
            assert part not in caplog.text


def test_the_command_without_the_job_variables_fails_cleanly() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bigtent", "agent", "--oidc", "github", "--audience", "bigtent"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "Error: --oidc github needs ACTIONS_ID_TOKEN_REQUEST_URL and "
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN in the environment, which GitHub Actions sets only in a "
        "job with `permissions: id-token: write` (see docs/github-actions.md)"
    ]
