"""RunnerClient against an in-process httpx.MockTransport: parsing, headers, error mapping."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from bigtent.client.api import RunnerClient, error_from_response, validation_problems
from bigtent.errors import (
    AuthError,
    BadRequest,
    BigtentError,
    ConfigError,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    RunnerUnreachable,
    UsageError,
)
from bigtent.states import BuildState

URL = "http://runner.test:8080"

BUILD = {
    "id": 7,
    "state": "running",
    "priority": 0,
    "created_at": "2024-01-01T00:00:00Z",
    "finished_at": None,
    "roots": [
        {
            "drv_path": "/nix/store/aaaa-hello.drv",
            "outputs": {"out": "/nix/store/bbbb-hello"},
            "step_id": 3,
            "state": "building",
        }
    ],
    "counts": {"total": 2, "waiting": 1, "running": 1, "succeeded": 0},
    "something_new": {"ignored": True},
}


Handler = Callable[[httpx.Request], httpx.Response]


def make_client(handler: Handler, token: str | None = "tok") -> RunnerClient:
    return RunnerClient(URL, token=token, transport=httpx.MockTransport(handler))


async def test_fetch_status_parses_and_sends_token() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json={
                "version": "0.1.0",
                "cache_url": f"{URL}/cache",
                "cache_public_key": "k-1:abc",
                "upstreams": [{"url": "https://up", "public_key": "up-1:x"}],
                "steps": {"running": 2},
                "agents_connected": 1,
                "builds_active": 1,
                "future_field": 1,
            },
        )

    async with make_client(handler) as client:
        status = await client.fetch_status()
    assert status.cache_public_key == "k-1:abc"
    assert status.upstreams[0].url == "https://up"
    assert status.steps == {"running": 2}
    assert seen[0].url.path == "/api/v1/status"
    assert seen[0].headers["authorization"] == "Bearer tok"


async def test_no_token_no_authorization_header() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert "authorization" not in request.headers
        return httpx.Response(200, json={"agents": []})

    async with make_client(handler, token=None) as client:
        assert await client.fetch_agents() == []


async def test_build_ids_are_numbers_and_unknown_fields_ignored() -> None:
    async with make_client(lambda r: httpx.Response(200, json=BUILD)) as client:
        build = await client.fetch_build("7")
    assert build.id == 7
    assert build.state is BuildState.RUNNING
    assert build.roots[0].step_id == 3
    assert build.counts.total == 2 and build.counts.runnable == 0
    assert build.failed_steps == []


@pytest.mark.parametrize(
    ("state", "final"),
    [
        ("queued", False),
        ("running", False),
        ("succeeded", True),
        ("failed", True),
        ("cancelled", True),
    ],
)
def test_build_state_is_final(state: str, final: bool) -> None:
    assert BuildState(state).is_final is final


async def test_missing_paths_posts_paths_and_skips_empty_requests() -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"missing": ["/nix/store/a-x"]})

    async with make_client(handler) as client:
        assert await client.missing_paths([]) == []
        assert await client.missing_paths(["/nix/store/a-x", "/nix/store/b-y"]) == [
            "/nix/store/a-x"
        ]
    assert bodies == [{"paths": ["/nix/store/a-x", "/nix/store/b-y"]}]


async def test_upload_path_streams_with_headers() -> None:
    got: dict[str, Any] = {}

    async def handler(request: httpx.Request) -> httpx.Response:
        got["path"] = request.url.path
        got["method"] = request.method
        got["headers"] = dict(request.headers)
        got["body"] = await request.aread()
        return httpx.Response(201, json={"path": "/nix/store/hhhh-src"})

    async def chunks() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"def"

    async with RunnerClient(URL, transport=httpx.MockTransport(handler)) as client:
        path = await client.upload_path(
            "/nix/store/hhhh-src",
            chunks(),
            nar_hash="sha256:0000",
            nar_size=6,
            references=["aaaa-dep", "bbbb-other"],
        )
    assert path == "/nix/store/hhhh-src"
    assert got["method"] == "PUT"
    assert got["path"] == "/api/v1/paths/hhhh-src"
    assert got["body"] == b"abcdef"
    assert got["headers"]["x-nar-hash"] == "sha256:0000"
    assert got["headers"]["x-nar-size"] == "6"
    assert got["headers"]["x-nar-references"] == "aaaa-dep bbbb-other"


async def test_create_build_and_bump_bodies() -> None:
    seen: list[tuple[str, str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.content))
        return httpx.Response(201 if request.url.path.endswith("builds") else 200, json=BUILD)

    async with make_client(handler) as client:
        await client.create_build(["/nix/store/aaaa-hello.drv"], priority=5)
        await client.bump_build("7")
        await client.bump_build("7", priority=42)
        await client.cancel_build("7")
    assert seen[0][:2] == ("POST", "/api/v1/builds")
    assert json.loads(seen[0][2]) == {"drvs": ["/nix/store/aaaa-hello.drv"], "priority": 5}
    assert seen[1][1] == "/api/v1/builds/7/bump" and json.loads(seen[1][2]) == {}
    assert json.loads(seen[2][2]) == {"priority": 42}
    assert seen[3][:2] == ("POST", "/api/v1/builds/7/cancel")


async def test_list_endpoints_and_log() -> None:
    step = {"id": 3, "drv_path": "/nix/store/aaaa-hello.drv", "state": "building"}
    routes: dict[str, httpx.Response] = {
        "/api/v1/builds": httpx.Response(200, json={"builds": [BUILD]}),
        "/api/v1/builds/7/steps": httpx.Response(200, json={"steps": [step]}),
        "/api/v1/steps/3": httpx.Response(200, json=step),
        "/api/v1/steps/3/log": httpx.Response(200, text="line 1\nline 2\n"),
    }
    params: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        params.append(str(request.url.params))
        return routes[request.url.path]

    async with make_client(handler) as client:
        assert [b.id for b in await client.fetch_builds(limit=5)] == [7]
        assert params[0] == "limit=5"
        assert (await client.fetch_steps("7"))[0].drv_path.endswith("hello.drv")
        assert (await client.fetch_step("3")).state == "building"
        assert await client.fetch_log("3") == "line 1\nline 2\n"


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequest),
        (401, AuthError),
        (403, Forbidden),
        (404, NotFound),
        (409, Conflict),
        (413, PayloadTooLarge),
    ],
)
async def test_error_bodies_map_to_error_classes(status: int, cls: type[BigtentError]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": f"runner says {status}", "detail": None})

    async with make_client(handler) as client:
        with pytest.raises(cls) as info:
            await client.fetch_build("1")
    assert type(info.value) is cls
    assert f"runner says {status}" in info.value.message


def test_413_is_a_bad_request() -> None:
    assert isinstance(error_from_response(413, b'{"error": "too big"}', URL), BadRequest)


def test_fastapi_detail_string_is_used_as_message() -> None:
    err = error_from_response(404, b'{"detail": "Not Found"}', URL)
    assert isinstance(err, NotFound) and err.message == "Not Found"


def test_non_json_server_error_names_status() -> None:
    err = error_from_response(500, b"<html>oops</html>", f"{URL}/api/v1/status")
    assert type(err) is BigtentError
    assert "500" in err.message and "oops" in err.message


def test_gateway_errors_are_unreachable() -> None:
    assert isinstance(error_from_response(502, b"", URL), RunnerUnreachable)


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("connection refused"),
        httpx.ConnectTimeout("timed out"),
        httpx.ReadTimeout("timed out"),
        httpx.RemoteProtocolError("peer closed"),
    ],
)
async def test_transport_failures_become_runner_unreachable(exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    async with make_client(handler) as client:
        with pytest.raises(RunnerUnreachable) as info:
            await client.fetch_status()
    assert info.value.message.startswith(f"cannot reach runner at {URL}")
    assert info.value.__cause__ is exc
    assert info.value.exit_code == 4


async def test_invalid_json_is_a_protocol_error() -> None:
    async with make_client(lambda r: httpx.Response(200, text="not json")) as client:
        with pytest.raises(ProtocolError):
            await client.fetch_status()


async def test_unexpected_shape_is_a_protocol_error() -> None:
    async with make_client(lambda r: httpx.Response(200, json={"builds": "nope"})) as client:
        with pytest.raises(ProtocolError, match="build list"):
            await client.fetch_builds()


def test_bad_url_scheme_is_rejected() -> None:
    with pytest.raises(BigtentError, match="http:// or https://"):
        RunnerClient("ftp://runner")


def test_missing_ca_file_is_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="cannot load CA file") as info:
        RunnerClient(URL, ca_file=tmp_path / "nope.pem")
    assert info.value.exit_code == 2


# ---- the runner's reasons -------------------------------------------------------------------

VALIDATION = {
    "error": "invalid request",
    "detail": [
        {"loc": ["body", "priority"], "msg": "Input should be less than or equal to 1000"},
        {"loc": ["body", "ref"], "msg": "String should match pattern '^\\S+$'"},
    ],
}


def test_a_malformed_request_shows_the_runner_s_reasons_as_a_usage_error() -> None:
    err = error_from_response(400, json.dumps(VALIDATION).encode(), URL)
    assert isinstance(err, UsageError) and err.exit_code == 2
    assert err.message == (
        "invalid request: priority: Input should be less than or equal to 1000; "
        "ref: String should match pattern '^\\S+$'"
    )
    assert validation_problems([{"loc": ["path", "step_id"], "msg": "bad"}]) == ["step_id: bad"]
    assert validation_problems("text") == [] and validation_problems([{"x": 1}]) == []
    other = error_from_response(400, b'{"error": "unknown derivation", "detail": null}', URL)
    assert type(other) is BadRequest and other.message == "unknown derivation"


async def test_an_authentication_error_names_the_runner_and_how_to_give_a_token() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        reason = "invalid token" if "authorization" in request.headers else "missing bearer token"
        return httpx.Response(401, json={"error": reason, "detail": None})

    async with make_client(handler, token=None) as client:
        with pytest.raises(AuthError) as info:
            await client.fetch_status()
    assert info.value.exit_code == 3
    assert info.value.message == (
        f"the runner at {URL} needs a client token (missing bearer token): set BIGTENT_TOKEN "
        "to the token or pass --token-file FILE"
    )
    client = RunnerClient(
        URL, token="t", transport=httpx.MockTransport(handler), token_source="--token-file /t"
    )
    async with client:
        with pytest.raises(AuthError) as info:
            await client.fetch_status()
    assert info.value.message == (
        f"the runner at {URL} refused the token from --token-file /t (invalid token): give a "
        "valid token in BIGTENT_TOKEN or with --token-file FILE"
    )


async def test_ids_that_are_no_number_are_refused_before_sending() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(500)

    async with make_client(handler) as client:
        with pytest.raises(UsageError, match="step id must be a positive number"):
            await client.fetch_log("abc")
        with pytest.raises(UsageError, match="build id must be a positive number"):
            await client.cancel_build("0")
        with pytest.raises(UsageError, match="build id"):
            await client.bump_build("1; drop", priority=1)
    assert seen == []


async def test_restart_build_and_drain_agent() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/restart"):
            return httpx.Response(200, json={"id": 7, "state": "queued"})
        return httpx.Response(200, json={"drained": "gha 1/x"})

    async with make_client(handler) as client:
        build = await client.restart_build("7")
        drained = await client.drain_agent("gha 1/x")
    assert (build.id, build.state.value) == (7, "queued")
    assert drained == "gha 1/x"
    assert [(r.method, r.url.raw_path) for r in seen] == [
        ("POST", b"/api/v1/builds/7/restart"),
        ("POST", b"/api/v1/agents/gha%201%2Fx/drain"),
    ]


async def test_agent_records_parse_with_and_without_the_new_fields() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        full = {
            "machine_id": "m1",
            "name": "a",
            "ephemeral": True,
            "steps_succeeded": 3,
            "infra_failures": 1,
            "consecutive_failures": 1,
            "backoff_until": "2024-05-01T10:05:00+00:00",
            "draining": True,
        }
        return httpx.Response(200, json={"agents": [full, {"machine_id": "m2"}]})

    async with make_client(handler) as client:
        full, bare = await client.fetch_agents()
    assert (full.steps_succeeded, full.consecutive_failures, full.draining) == (3, 1, True)
    assert (bare.backoff_until, bare.consecutive_failures, bare.launch_id) == (None, 0, None)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("localhost:8080", "must start with http:// or https://"),
        ("http://:99", "names no host"),
        ("http://a b", "contains whitespace"),
        ("https://[::1", "invalid runner URL"),
        ("http://127.0.0.1:99999", "invalid runner URL"),
    ],
)
def test_malformed_runner_urls_are_usage_errors(url: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        RunnerClient(url)
    assert info.value.exit_code == 2
