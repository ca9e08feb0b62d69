"""``bigtent steps``, ``bigtent builds`` filters and ``bigtent log --follow`` through the
real entry point against an in-process runner."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.unit.cli.helpers import WIDE, RunnerStub, parse_table, run_cli

STEPS = [
    {
        "id": 7,
        "drv_path": "/nix/store/aaaa-hello-2.12.drv",
        "name": "hello-2.12",
        "state": "succeeded",
        "outcome": "success",
        "agent_name": "local-1",
        "attempts": 1,
        "started_at": "2024-05-01T10:00:00+00:00",
        "finished_at": "2024-05-01T10:01:05+00:00",
    },
    {
        "id": 8,
        "drv_path": "/nix/store/bbbb-hello-arm.drv",
        "name": "hello-arm",
        "state": "runnable",
        "waiting_reason": "waiting for capacity: no agent offers aarch64-linux",
    },
]


def test_steps_lists_a_builds_steps(runner_stub: RunnerStub) -> None:
    seen: list[httpx.Request] = []

    def runner(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/api/v1/builds/3/steps":
            return httpx.Response(200, json={"steps": STEPS})
        return httpx.Response(404, json={"error": "no build 4"})

    runner_stub.answer(runner)
    result = run_cli(["steps", "3"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in parse_table(result.stdout)}
    hello = rows["hello-2.12"]
    assert hello["id"] == "7" and hello["state"] == "succeeded" and hello["agent"] == "local-1"
    assert hello["retries"] == "1" and hello["took"] == "1 min 05 s" and hello["outcome"] == "-"
    assert hello["started"] == "2024-05-01 10:00"  # long ago: the date, to the minute
    arm = rows["hello-arm"]
    assert arm["state"] == "runnable" and arm["agent"] == "-" and arm["started"] == "-"
    assert arm["outcome"] == "waiting for capacity: no agent offers aarch64-linux"

    doc = json.loads(run_cli(["steps", "3", "--json"]).stdout)
    assert [s["id"] for s in doc] == ["7", "8"] and doc[0]["agent_name"] == "local-1"

    missing = run_cli(["steps", "4"])
    assert missing.exit_code != 0 and missing.stderr == "Error: no build 4\n"


def test_builds_filters_are_query_parameters(runner_stub: RunnerStub) -> None:
    seen: list[httpx.Request] = []

    def runner(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"builds": []})

    runner_stub.answer(runner)
    args = ["builds", "--state", "failed", "--state", "running", "--repository", "acme/w"]
    result = run_cli([*args, "--ref", "refs/heads/main", "--mine", "--limit", "7"])
    assert result.exit_code == 0, result.output
    assert result.stderr == "no builds\n"
    assert dict(seen[-1].url.params) == {
        "limit": "7",
        "state": "failed,running",
        "repository": "acme/w",
        "ref": "refs/heads/main",
        "mine": "true",
    }
    run_cli(["builds"])
    assert dict(seen[-1].url.params) == {"limit": "50"}


def _sse(*events: tuple[str, Any, int | None]) -> str:
    out = "retry: 1000\n\n"
    for event, data, ident in events:
        head = f"id: {ident}\n" if ident is not None else ""
        out += f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"
    return out


def test_log_follows_a_running_step_and_resumes_where_it_was(
    runner_stub: RunnerStub,
) -> None:
    seen: list[httpx.Request] = []

    def runner(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/api/v1/steps/5":
            return httpx.Response(200, json={"id": 5, "drv_path": "/x.drv", "state": "building"})
        assert request.url.path == "/api/v1/steps/5/events"
        if request.url.params["from"] == "0":  # the first stream ends early (fell behind)
            return httpx.Response(200, text=_sse(("log", "configuring\nbui", 15)))
        assert request.url.params["from"] == "15"
        return httpx.Response(
            200,
            text=_sse(("log", "lding\n", 21), ("end", {"state": "succeeded"}, 21)),
            headers={"content-type": "text/event-stream"},
        )

    runner_stub.answer(runner)
    result = run_cli(["log", "5"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "configuring\nbuilding\n"
    assert [r.url.path for r in seen] == [
        "/api/v1/steps/5",
        "/api/v1/steps/5/events",
        "/api/v1/steps/5/events",
    ]


def test_log_no_follow_and_a_finished_step_print_what_is_there(
    runner_stub: RunnerStub,
) -> None:
    seen: list[str] = []

    def runner(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/api/v1/steps/5":
            return httpx.Response(200, json={"id": 5, "drv_path": "/x.drv", "state": "failed"})
        if request.url.path == "/api/v1/steps/5/log":
            return httpx.Response(200, text="no newline at the end")
        return httpx.Response(500, json={"error": "not asked for"})

    runner_stub.answer(runner)
    result = run_cli(["log", "5"])
    assert result.stdout == "no newline at the end\n"
    assert seen == ["/api/v1/steps/5", "/api/v1/steps/5/log"]
    seen.clear()
    assert run_cli(["log", "5", "--no-follow"]).exit_code == 0
    assert seen == ["/api/v1/steps/5/log"]  # no look at the step: told not to follow
