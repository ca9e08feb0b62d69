"""Credential sources as values: the ID token request URL, expiry arithmetic, which source a
config picks, and comma-separated lists (no network: the Actions endpoint is an
``httpx.MockTransport`` here; tests/integration/agent/test_github_oidc.py uses a real server)."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.agent.credentials import (
    ACTIONS_TOKEN_VAR,
    ACTIONS_URL_VAR,
    GithubActionsToken,
    StaticToken,
    TokenFile,
    TokenTimes,
    as_credential_source,
    github_actions_token,
    id_token_request_url,
    load_credentials,
    still_usable,
    token_times,
    unverified_claims,
)
from bigtent.config import AgentSection, OidcProvider, load_agent_config, split_comma_list
from bigtent.errors import ConfigError, CredentialUnavailable

GH_ENV = {
    ACTIONS_URL_VAR: "https://actions.example/idtoken?api-version=2.0",
    ACTIONS_TOKEN_VAR: "rt",
}


def fake_jwt(**claims: Any) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'kid': 'k'})}.{part(claims)}.c2ln"


# ---- comma-separated lists ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("given_values", "expected"),
    [
        ("", []),
        (" , ,", []),
        ("x86_64-linux", ["x86_64-linux"]),
        ("x86_64-linux, i686-linux ,", ["x86_64-linux", "i686-linux"]),
        (["kvm", "big-parallel,kvm", " nixos-test "], ["kvm", "big-parallel", "nixos-test"]),
        ((), []),
        (("a,,b", ""), ["a", "b"]),
    ],
)
def test_split_comma_list(
    given_values: str | list[str] | tuple[str, ...], expected: list[str]
) -> None:
    assert split_comma_list(given_values) == expected


@given(st.lists(st.text(alphabet="ab ,\t", max_size=8), max_size=5))
def test_split_comma_list_items_are_trimmed_nonempty_unique(values: list[str]) -> None:
    out = split_comma_list(values)
    assert all(item and item == item.strip() and "," not in item for item in out)
    assert len(out) == len(set(out))
    # Nothing is lost: every non-blank piece comes out.
    pieces = {p.strip() for v in values for p in v.split(",") if p.strip()}
    assert set(out) == pieces


# ---- the request URL ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://pipelines.example/abc/idtoken?api-version=2.0",
            "https://pipelines.example/abc/idtoken?api-version=2.0&audience=bigtent",
        ),
        ("https://p.example/idtoken", "https://p.example/idtoken?audience=bigtent"),
        ("https://p.example/idtoken?", "https://p.example/idtoken?audience=bigtent"),
        ("https://p.example/idtoken?a=1&", "https://p.example/idtoken?a=1&audience=bigtent"),
    ],
)
def test_id_token_request_url_adds_the_audience(url: str, expected: str) -> None:
    assert id_token_request_url(url, "bigtent") == expected


def test_id_token_request_url_encodes_the_audience() -> None:
    url = id_token_request_url("https://p.example/t?v=2", "https://ci.example.org/a b&c")
    assert url == "https://p.example/t?v=2&audience=https%3A%2F%2Fci.example.org%2Fa+b%26c"


# ---- expiry ------------------------------------------------------------------------------
def test_token_times_reads_the_unverified_payload() -> None:
    assert token_times(fake_jwt(iat=1000, exp=1300)) == TokenTimes(1000.0, 1300.0)
    assert token_times(fake_jwt(sub="x")) == TokenTimes(None, None)
    assert token_times(fake_jwt(iat="soon", exp=True)) == TokenTimes(None, None)
    for junk in ("", "not-a-jwt", "a.b.c", "a.!!!.c", "a." + "W10" + ".c"):
        assert token_times(junk) == TokenTimes(None, None)
        assert unverified_claims(junk) == {}


@pytest.mark.parametrize(
    ("times", "now", "usable"),
    [
        (TokenTimes(0, 600), 0, True),
        (TokenTimes(0, 600), 479, True),  # 121 s left of a 120 s margin
        (TokenTimes(0, 600), 480, False),
        (TokenTimes(0, 60), 29, True),  # short-lived: half its life is the margin
        (TokenTimes(0, 60), 30, False),
        (TokenTimes(None, 600), 0, True),
        (TokenTimes(None, 600), 480, False),
        (TokenTimes(0, None), 0, False),  # no exp: never reused
        (TokenTimes(0, 600), 700, False),
    ],
)
def test_still_usable(times: TokenTimes, now: float, usable: bool) -> None:
    assert still_usable(times, now) is usable


@given(st.floats(0, 1e6), st.floats(1, 1e4), st.floats(0, 2e6), st.floats(0, 1e3))
def test_a_usable_token_has_more_than_the_margin_left(
    iat: float, life: float, now: float, margin: float
) -> None:
    times = TokenTimes(iat, iat + life)
    if still_usable(times, now, margin):
        assert iat + life - now > min(margin, life / 2)
    else:
        assert iat + life - now <= margin


# ---- the GitHub source against a mock transport ------------------------------------------
class Endpoint:
    def __init__(self, *answers: httpx.Response) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def source(endpoint: Endpoint, now: list[float], **kwargs: Any) -> GithubActionsToken:
    return github_actions_token(
        GH_ENV,
        "bigtent",
        clock=lambda: now[0],
        transport=httpx.MockTransport(endpoint),
        retry_delays_secs=(0.0, 0.0),
        **kwargs,
    )


async def test_fresh_fetches_a_new_token_and_uploads_reuse_it_until_near_expiry() -> None:
    now = [1000.0]
    first, second = fake_jwt(iat=1000, exp=1600), fake_jwt(iat=1490, exp=2090)
    endpoint = Endpoint(
        httpx.Response(200, json={"value": first}), httpx.Response(200, json={"value": second})
    )
    src = source(endpoint, now)
    assert await src.credential(fresh=True) == first
    now[0] = 1479.0
    assert await src.credential(fresh=False) == first  # 121 s left
    assert src.fetches == 1
    now[0] = 1490.0
    assert await src.credential(fresh=False) == second
    assert src.fetches == 2
    request = endpoint.requests[0]
    assert request.headers["authorization"] == "bearer rt"
    assert request.url.params["audience"] == "bigtent"
    assert request.url.params["api-version"] == "2.0"


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ([httpx.Response(403, text="forbidden")], "HTTP 403: forbidden (does the job have"),
        ([httpx.Response(200, json={"other": 1})], 'no token (no "value")'),
        ([httpx.Response(200, text="<html>")], 'no token (no "value")'),
        ([httpx.Response(503, text="busy")], "HTTP 503: busy; gave up after 3 tries"),
    ],
)
async def test_failures_are_clear_errors(answers: list[httpx.Response], message: str) -> None:
    endpoint = Endpoint(*answers)
    with pytest.raises(CredentialUnavailable) as caught:
        await source(endpoint, [0.0]).credential(fresh=True)
    assert message in caught.value.message
    assert "rt" not in caught.value.message.split()


async def test_a_5xx_then_success_is_retried() -> None:
    token = fake_jwt(exp=900)
    endpoint = Endpoint(httpx.Response(502), httpx.Response(200, json={"value": token}))
    src = source(endpoint, [0.0])
    assert await src.credential(fresh=True) == token
    assert len(endpoint.requests) == 2


def test_missing_variables_say_what_to_do() -> None:
    for env in ({}, {ACTIONS_URL_VAR: GH_ENV[ACTIONS_URL_VAR]}, {ACTIONS_TOKEN_VAR: "x"}):
        with pytest.raises(ConfigError) as caught:
            github_actions_token(env, "bigtent")
        assert "permissions: id-token: write" in caught.value.message
    for bad in ("file:///etc/passwd", "https://", "https://host:port/t"):
        with pytest.raises(ConfigError, match="not an http"):
            github_actions_token({**GH_ENV, ACTIONS_URL_VAR: bad}, "bigtent")


def test_the_request_token_is_not_in_the_repr() -> None:
    src = github_actions_token({**GH_ENV, ACTIONS_TOKEN_VAR: "very-secret"}, "aud")
    assert "very-secret" not in repr(src)
    assert "hush" not in repr(StaticToken("hush"))


# ---- choosing a source -------------------------------------------------------------------
async def test_load_credentials_precedence(tmp_path: Path) -> None:
    (tmp_path / "flag").write_text("from-flag\n")
    (tmp_path / "conf").write_text("from-config\n")
    section = AgentSection(token_file=tmp_path / "conf")

    async def value(src: object) -> str | None:
        assert isinstance(src, StaticToken | TokenFile)
        return await src.credential(fresh=True)

    env = {"BIGTENT_AGENT_TOKEN": "from-env"}
    assert await value(load_credentials(section, env, token_file_flag=tmp_path / "flag")) == (
        "from-flag"
    )
    assert await value(load_credentials(section, env)) == "from-env"
    assert await value(load_credentials(section, {})) == "from-config"
    assert load_credentials(AgentSection(), {}) is None

    oidc = AgentSection(oidc=OidcProvider.GITHUB, audience="bigtent")
    assert isinstance(load_credentials(oidc, GH_ENV), GithubActionsToken)
    with pytest.raises(ConfigError, match="both given"):
        load_credentials(oidc, {**GH_ENV, "BIGTENT_AGENT_TOKEN": "t"})
    with pytest.raises(ConfigError, match="both given"):
        load_credentials(oidc.model_copy(update={"token_file": tmp_path / "conf"}), GH_ENV)


async def test_a_token_file_is_read_again_at_each_connect(tmp_path: Path) -> None:
    path = tmp_path / "tok"
    path.write_text("one\n")
    src = TokenFile(path)
    path.write_text("two\n")
    assert await src.credential(fresh=False) == "one"  # uploads: the value of the last connect
    assert await src.credential(fresh=True) == "two"
    path.unlink()
    with pytest.raises(CredentialUnavailable, match="cannot read token file"):
        await src.credential(fresh=True)
    with pytest.raises(ConfigError, match="is empty"):
        path.write_text("\n")
        TokenFile(path)


def test_as_credential_source() -> None:
    assert as_credential_source(None) is None
    assert as_credential_source("") is None
    assert isinstance(as_credential_source("t"), StaticToken)


# ---- config --------------------------------------------------------------------------------
def test_oidc_implies_ephemeral_and_needs_an_audience() -> None:
    cfg = load_agent_config(agent={"oidc": "github", "audience": "bigtent"})
    assert cfg.agent.oidc is OidcProvider.GITHUB and cfg.agent.ephemeral is not None
    with pytest.raises(ConfigError, match="needs an audience"):
        load_agent_config(agent={"oidc": "github"})
    with pytest.raises(ConfigError):
        load_agent_config(agent={"oidc": "gitlab", "audience": "x"})


def test_launch_id_blank_is_none_and_bounded() -> None:
    assert load_agent_config(agent={"launch_id": "  "}).agent.launch_id is None
    assert load_agent_config(agent={"launch_id": "L-1"}).agent.launch_id == "L-1"
    with pytest.raises(ConfigError):
        load_agent_config(agent={"launch_id": "x" * 257})


async def test_fetch_logs_no_token(caplog: pytest.LogCaptureFixture) -> None:
    token = fake_jwt(sub="repo:acme/widgets:ref:refs/heads/main", exp=900)
    endpoint = Endpoint(httpx.Response(200, json={"value": token}))
    with caplog.at_level(logging.DEBUG):
        await source(endpoint, [0.0]).credential(fresh=True)
    assert "repo:acme/widgets:ref:refs/heads/main" in caplog.text
    assert token not in caplog.text and "rt" not in caplog.text.split()
