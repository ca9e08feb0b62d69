"""The workflow_dispatch client against an in-process GitHub (httpx.MockTransport): the
request it sends, success only on 204, and every failure a ``DispatchFailed`` with GitHub's
wait hint and without the token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import httpx
import pytest

from bigtent.config.autoscale import GithubPoolSection
from bigtent.errors import DispatchFailed
from bigtent.runner.autoscale.github import API_VERSION, GithubWorkflow, parse_retry_after

T0 = 1_700_000_000.0
TOKEN = "ghs_0123456789abcdef"
POOL = GithubPoolSection.model_validate(
    {
        "name": "gha",
        "systems": ["x86_64-linux"],
        "allowed_build_repositories": ["acme/widgets"],
        "workflow_repository": "acme/bigtent-agents",
        "token": TOKEN,
        "runner_url": "https://ci.example.org:8443",
        "audience": "bigtent",
        "api_url": "https://github.example/api/v3/",
        "ref": "release-1",
    }
)
INPUTS = {"launch_id": "abc", "max_jobs": "2"}


def workflow(handler: Callable[[httpx.Request], httpx.Response], **change: Any) -> GithubWorkflow:
    pool = POOL.model_copy(update=change) if change else POOL
    return GithubWorkflow(pool, TOKEN, transport=httpx.MockTransport(handler))


async def test_a_dispatch_posts_ref_and_inputs_with_the_token_and_api_headers() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    w = workflow(handler)
    await w.dispatch(INPUTS, T0)
    await w.aclose()
    (req,) = seen
    assert req.method == "POST"
    assert str(req.url) == (
        "https://github.example/api/v3/repos/acme/bigtent-agents/actions/workflows/"
        "bigtent-agent.yml/dispatches"
    )
    assert req.headers["authorization"] == f"Bearer {TOKEN}"
    assert req.headers["accept"] == "application/vnd.github+json"
    assert req.headers["x-github-api-version"] == API_VERSION
    assert req.headers["user-agent"].startswith("bigtent/")
    assert json.loads(req.content) == {"ref": "release-1", "inputs": INPUTS}


async def test_a_numeric_workflow_id_is_in_the_path() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(204)

    await workflow(handler, workflow="161335").dispatch(INPUTS, T0)
    assert seen == ["/api/v3/repos/acme/bigtent-agents/actions/workflows/161335/dispatches"]


@pytest.mark.parametrize(
    ("response", "status", "retry_after", "text"),
    [
        # 200 is not success: only 204 is (a run-details answer is not what we asked for).
        (httpx.Response(200, json={}), 200, None, "HTTP 200"),
        (httpx.Response(404, json={"message": "Not Found"}), 404, None, "check the token"),
        (
            httpx.Response(422, json={"message": 'Unexpected inputs provided: ["name"]'}),
            422,
            None,
            "Unexpected inputs provided",
        ),
        (
            httpx.Response(429, headers={"Retry-After": "120"}, json={"message": "slow down"}),
            429,
            120.0,
            "slow down",
        ),
        (
            httpx.Response(
                403,
                headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(T0) + 600)},
                json={"message": "API rate limit exceeded"},
            ),
            403,
            600.0,
            "rate limit",
        ),
        (httpx.Response(500, text="<html>oops</html>"), 500, None, "HTTP 500: <html>oops</html>"),
        (httpx.Response(503, headers={"Retry-After": "7"}), 503, 7.0, "no message"),
    ],
)
async def test_every_other_answer_fails_with_status_and_wait_hint(
    response: httpx.Response, status: int, retry_after: float | None, text: str
) -> None:
    with pytest.raises(DispatchFailed) as err:
        await workflow(lambda _: response).dispatch(INPUTS, T0)
    assert err.value.status == status
    assert err.value.retry_after_secs == retry_after
    assert text in err.value.message
    assert "acme/bigtent-agents/bigtent-agent.yml@release-1" in err.value.message
    assert TOKEN not in err.value.message


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (httpx.ConnectTimeout("connect timed out"), "timed out (ConnectTimeout)"),
        (httpx.ReadTimeout("read timed out"), "timed out (ReadTimeout)"),
        (httpx.ConnectError("connection refused"), "cannot reach https://github.example"),
    ],
)
async def test_network_failures_and_timeouts_fail(exc: Exception, text: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(DispatchFailed) as err:
        await workflow(handler).dispatch(INPUTS, T0)
    assert text in err.value.message
    assert err.value.status is None and err.value.retry_after_secs is None


async def test_the_total_timeout_bounds_a_slow_answer() -> None:
    """The connect/read timeouts are per operation; the whole call also has a deadline."""

    class Hanging(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            await asyncio.Event().wait()  # never answers
            raise AssertionError("unreachable")

    w = GithubWorkflow(
        POOL.model_copy(update={"dispatch_timeout_secs": 0.05}), TOKEN, transport=Hanging()
    )
    with pytest.raises(DispatchFailed, match=r"no answer within 0\.05 s"):
        await w.dispatch(INPUTS, T0)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "30"}, 30.0),
        ({"retry-after": " 0 "}, 0.0),
        ({"retry-after": formatdate(T0 + 90, usegmt=True)}, 90.0),
        ({"retry-after": formatdate(T0 - 90, usegmt=True)}, 0.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-5"}, None),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(T0) + 42)}, 42.0),
        ({"x-ratelimit-remaining": "10", "x-ratelimit-reset": str(int(T0) + 42)}, None),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "never"}, None),
        # Retry-After wins over the rate-limit reset.
        ({"retry-after": "5", "x-ratelimit-remaining": "0", "x-ratelimit-reset": "1"}, 5.0),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(httpx.Headers(headers), T0) == expected
