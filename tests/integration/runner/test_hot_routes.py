"""The hot routes (runner/http/hotpath.py) answer as FastAPI's routes did: each request is
sent twice on a served runner, once taken by the hot path and once, with the hot path turned
off, by FastAPI; status, headers and body must be the same, and the first must not have
entered FastAPI's middleware stack."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from bigtent.apilimits import BUILD_WAIT_MAX_SECS
from bigtent.apimodels import WAITED_HEADER, Build
from bigtent.config import Role
from bigtent.nix.store_path import StorePath
from bigtent.runner.http.app import RunnerApp
from tests.integration.runner.conftest import (
    Drvs,
    MakeRunner,
    Nix,
    RunnerHarness,
    eventually,
    upload_closure,
)

MISSING = "0" * 32


@contextmanager
def fastapi_entries(runner: RunnerHarness) -> Iterator[list[str]]:
    """The paths of the requests that entered FastAPI's middleware stack meanwhile."""
    app = runner.app
    assert isinstance(app, RunnerApp)
    real = app.middleware_stack
    assert real is not None  # built by the served app's lifespan
    entered: list[str] = []

    async def spy(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            entered.append(scope["path"])
        await real(scope, receive, send)

    app.middleware_stack = spy
    try:
        yield entered
    finally:
        app.middleware_stack = real


@contextmanager
def without_hot_path(runner: RunnerHarness) -> Iterator[None]:
    app = runner.app
    assert isinstance(app, RunnerApp)
    gate, app.hot_gate = app.hot_gate, None
    try:
        yield
    finally:
        app.hot_gate = gate


def _shown(resp: httpx.Response) -> tuple[int, dict[str, str], bytes]:
    headers = {k: v for k, v in resp.headers.items() if k != "date"}
    return resp.status_code, headers, resp.content


async def same_answer(
    runner: RunnerHarness,
    method: str,
    path: str,
    *,
    hot: bool = True,
    token: str | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """Send the request by the hot path and by FastAPI; assert both answer alike and that
    the first took the hot path (``hot``) or not; return the first answer."""
    headers: dict[str, str] = kwargs.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with httpx.AsyncClient(base_url=runner.url or "", timeout=30) as client:
        with fastapi_entries(runner) as entered:
            first = await client.request(method, path, headers=headers, **kwargs)
        assert entered == ([] if hot else [path])
        with without_hot_path(runner), fastapi_entries(runner) as entered:
            second = await client.request(method, path, headers=headers, **kwargs)
        assert entered == [path]
    assert _shown(first) == _shown(second)
    return first


@pytest.fixture
async def cached(make_runner: MakeRunner, nix: Nix, drvs: Drvs) -> tuple[RunnerHarness, str]:
    """A served runner with the drvs' closure cached; the hash part of one cached path."""
    runner = await make_runner(serve=True)
    await upload_closure(runner, nix, drvs.closure)
    return runner, StorePath.parse(drvs.source).hash_part


async def test_cache_reads(cached: tuple[RunnerHarness, str]) -> None:
    runner, hash_part = cached
    narinfo = await same_answer(runner, "GET", f"/cache/{hash_part}.narinfo")
    assert narinfo.status_code == 200
    assert narinfo.headers["content-type"].startswith("text/x-nix-narinfo")
    head = await same_answer(runner, "HEAD", f"/cache/{hash_part}.narinfo")
    assert head.status_code == 200
    assert head.content == b""
    url = next(x.split(": ", 1)[1] for x in narinfo.text.splitlines() if x.startswith("URL: "))
    nar = await same_answer(runner, "GET", f"/cache/{url}")
    assert nar.status_code == 200
    assert nar.headers["content-type"] == "application/x-nix-nar"
    assert len(nar.content) == int(nar.headers["content-length"]) > 2
    assert (await same_answer(runner, "HEAD", f"/cache/{url}")).content == b""
    part = await same_answer(runner, "GET", f"/cache/{url}", headers={"Range": "bytes=1-2"})
    assert part.status_code == 206
    assert part.content == nar.content[1:3]
    bad_range = await same_answer(runner, "GET", f"/cache/{url}", headers={"Range": "bytes=9999-"})
    assert bad_range.status_code == 416


@pytest.mark.parametrize(
    "path",
    [
        f"/cache/{MISSING}.narinfo",
        "/cache/short.narinfo",
        "/cache/untrusted.narinfo",
        f"/cache/untrusted/{MISSING}.narinfo",
        "/cache/nar/none.nar.zst",
        "/cache/untrusted/nar/none.nar",
        "/cache/nar/" + "x" * 300,
    ],
)
async def test_cache_misses(cached: tuple[RunnerHarness, str], path: str) -> None:
    runner, _ = cached
    miss = await same_answer(runner, "GET", path)
    assert miss.status_code == 404
    assert miss.json()["error"].startswith("no such")
    assert (await same_answer(runner, "HEAD", path)).status_code == 404


async def test_what_the_hot_path_leaves_to_fastapi(cached: tuple[RunnerHarness, str]) -> None:
    runner, hash_part = cached
    path = f"/cache/{hash_part}.narinfo"
    refused = await same_answer(runner, "POST", path, hot=False)
    assert refused.status_code == 405
    # A GET with a body has the app's body limit applied (FastAPI's).
    too_large = await same_answer(runner, "GET", path, hot=False, content=b"x" * (2 << 20))
    assert too_large.status_code == 413
    info = await same_answer(runner, "GET", "/cache/nix-cache-info", hot=False)
    assert info.status_code == 200


async def test_build_polls(cached: tuple[RunnerHarness, str], drvs: Drvs) -> None:
    runner, _ = cached
    client = runner.tokens[Role.CLIENT]
    created = await runner.client(Role.CLIENT).post("/api/v1/builds", json={"drvs": [drvs.top]})
    assert created.status_code == 201
    path = f"/api/v1/builds/{created.json()['id']}"
    shown = await same_answer(runner, "GET", path, token=client)
    assert shown.status_code == 200
    assert shown.json()["id"] == created.json()["id"]
    assert (await same_answer(runner, "GET", path)).status_code == 401  # the gate
    assert (await same_answer(runner, "GET", path, token="nope")).status_code == 401
    agent = await same_answer(runner, "GET", path, token=runner.tokens[Role.AGENT])
    assert agent.status_code == 403  # the route: a client's
    unknown = await same_answer(runner, "GET", "/api/v1/builds/999999", token=client)
    assert unknown.status_code == 404
    assert (await same_answer(runner, "GET", "/api/v1/builds/0", token=client)).status_code == 404
    head = await same_answer(runner, "HEAD", path, hot=False, token=client)
    assert head.status_code == 405  # a GET route of FastAPI's takes no HEAD
    for odd in ("x1", "1" * 19, "-1"):
        answer = await same_answer(runner, "GET", f"/api/v1/builds/{odd}", hot=False, token=client)
        assert answer.status_code in (400, 404)


async def test_output_upload_refusals(cached: tuple[RunnerHarness, str]) -> None:
    runner, _ = cached
    path = "/api/v1/agent/upload/no-such-lease/out"
    declared = {"X-Nar-Hash": "sha256:" + "0" * 52, "X-Nar-Size": "8"}
    body = b"\0" * 8
    no_credential = await same_answer(runner, "PUT", path, headers=dict(declared), content=body)
    assert no_credential.status_code == 401
    assert no_credential.headers["www-authenticate"] == "Bearer"
    for role, status in ((Role.CLIENT, 403), (Role.AGENT, 409)):
        answer = await same_answer(
            runner, "PUT", path, token=runner.tokens[role], headers=dict(declared), content=body
        )
        assert answer.status_code == status
    # A JWT passes the gate (an OIDC agent's); the route verifies it: no issuer here.
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    refused = await same_answer(
        runner, "PUT", path, token=jwt, headers=dict(declared), content=body
    )
    assert refused.status_code == 401


async def test_client_path_uploads(make_runner: MakeRunner, nix: Nix, drvs: Drvs) -> None:
    runner = await make_runner(serve=True)
    up = nix.upload(drvs.source)
    path = f"/api/v1/paths/{up.basename}"
    client = runner.tokens[Role.CLIENT]
    for token, status in ((None, 401), ("nope", 401), (runner.tokens[Role.AGENT], 403)):
        refused = await same_answer(
            runner, "PUT", path, token=token, headers=up.headers(), content=up.nar
        )
        assert refused.status_code == status
    wrong = up.headers({"X-Nar-Size": str(len(up.nar) + 1)})
    bad = await same_answer(runner, "PUT", path, token=client, headers=wrong, content=up.nar)
    assert bad.status_code == 400
    odd = await same_answer(
        runner, "PUT", "/api/v1/paths/not-a-path", token=client, headers=up.headers(), content=b""
    )
    assert odd.status_code == 400
    assert runner.temp_files() == []
    # Created by the hot path; then present, the same answer both ways.
    async with httpx.AsyncClient(base_url=runner.url or "", timeout=30) as http:
        with fastapi_entries(runner) as entered:
            created = await http.put(
                path, content=up.nar, headers=up.headers() | {"Authorization": f"Bearer {client}"}
            )
        assert entered == []
    assert created.status_code == 201
    assert created.json() == {"path": drvs.source}
    headers = up.headers()
    again = await same_answer(runner, "PUT", path, token=client, headers=headers, content=up.nar)
    assert again.status_code == 200
    assert (await runner.narinfo(drvs.source)).status_code == 200


async def test_the_schema_still_lists_the_hot_api_routes(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    paths = (await runner.client(None).get("/api/v1/openapi.json")).json()["paths"]
    assert "put" in paths["/api/v1/agent/upload/{lease_id}/{output_name}"]
    assert "put" in paths["/api/v1/paths/{basename}"]
    assert "get" in paths["/api/v1/builds/{build_id}"]
    assert not [p for p in paths if p.startswith("/cache")]  # never were


async def test_build_waits(cached: tuple[RunnerHarness, str], drvs: Drvs) -> None:
    """``?wait=&seen=`` through both paths: refused values, an answer at once when the build
    is not as the client saw it, and at the wait's end with the same body when it is."""
    runner, _ = cached
    client = runner.tokens[Role.CLIENT]
    created = await runner.client(Role.CLIENT).post("/api/v1/builds", json={"drvs": [drvs.top]})
    path = f"/api/v1/builds/{created.json()['id']}"
    bad: list[dict[str, str]] = [
        {"wait": "1"},
        {"seen": "x"},
        {"wait": "soon", "seen": "x"},
        {"wait": "11", "seen": "x"},
        {"wait": "1", "seen": ""},
    ]
    for query in bad:
        refused = await same_answer(runner, "GET", path, token=client, params=query)
        assert refused.status_code == 422, query
        assert refused.json()["error"].startswith(("wait", "seen")), query
    http = runner.client(Role.CLIENT)

    async def settled() -> bool:
        # With no agent, its runnable step is said to wait for capacity after a grace period:
        # from then on the build stays as it is.
        return bool((await http.get(path)).json()["waiting_for_capacity_count"])

    await eventually(settled)
    plain = await same_answer(runner, "GET", path, token=client)
    build = Build.model_validate(plain.json())
    # No agent: the build stays as it is, and the wait answers at its end what it saw.
    unchanged = {"wait": "0.2", "seen": build.progress_token()}
    same = await same_answer(runner, "GET", path, token=client, params=unchanged)
    assert same.content == plain.content and same.headers[WAITED_HEADER] == "0.2"
    assert WAITED_HEADER not in plain.headers
    state_only = {"wait": "0.2", "seen": build.state.value}
    same = await same_answer(runner, "GET", path, token=client, params=state_only)
    assert same.content == plain.content
    other = {"wait": "10", "seen": "queued.0"}
    assert (await same_answer(runner, "GET", path, token=client, params=other)).content == (
        plain.content
    )


async def test_a_wait_ends_when_the_build_does(
    cached: tuple[RunnerHarness, str], drvs: Drvs
) -> None:
    """A request waiting for the build's state to change is answered once the scheduler
    ended it (cancelled here), not at its cap: the watch woke it."""
    runner, _ = cached
    http = runner.client(Role.CLIENT)
    created = await http.post("/api/v1/builds", json={"drvs": [drvs.top]})
    build = Build.model_validate(created.json())
    watch = runner.comps.scheduler.build_watch
    woken: list[int] = []
    ended = watch.ended

    def spy(build_ids: Iterable[int]) -> None:
        ids = list(build_ids)
        if watch.waiters():
            woken.extend(ids)
        ended(ids)

    watch.ended = spy  # type: ignore[method-assign]
    registered = asyncio.Event()
    watching = watch.watching

    @contextmanager
    def announced(build_id: int, *, steps: bool) -> Iterator[asyncio.Future[None]]:
        with watching(build_id, steps=steps) as future:
            registered.set()
            yield future

    watch.watching = announced  # type: ignore[method-assign]
    query = {"wait": f"{BUILD_WAIT_MAX_SECS:g}", "seen": build.state.value}
    waiting = asyncio.create_task(http.get(f"/api/v1/builds/{build.id}", params=query))
    await registered.wait()
    assert await runner.comps.scheduler.cancel_build(build.id)
    answer = await waiting
    assert answer.status_code == 200
    assert answer.json()["state"] == "cancelled"
    assert answer.headers[WAITED_HEADER] == f"{BUILD_WAIT_MAX_SECS:g}"
    assert woken == [build.id]
