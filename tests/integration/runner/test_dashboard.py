"""The dashboard over HTTP: who may read it (``runner.dashboard_auth``), who may act and how
forged forms are refused (CSRF token and origin), and the live log as server-sent events
fanned out from one producer to many viewers."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from bigtent import protocol as p
from bigtent.config import Role, load_runner_config
from bigtent.nix.keys import generate_key
from bigtent.runner.components import build_components, close_components
from bigtent.runner.dashboard import logstream
from bigtent.runner.dashboard.auth import SESSION_COOKIE
from bigtent.runner.db import queries
from bigtent.runner.http.app import create_app
from bigtent.runner.logs.live import LogFanout
from bigtent.runner.logs.store import LogStore
from tests.integration.runner.conftest import (
    WAIT_SECS,
    Drvs,
    MakeRunner,
    Nix,
    RunnerHarness,
    agent_socket,
    eventually,
    receive_until,
    register,
    upload_closure,
)

ORIGIN = "http://runner.test"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


async def _build(runner: RunnerHarness, nix: Nix, drvs: Drvs) -> int:
    await upload_closure(runner, nix, drvs.closure)
    resp = await runner.client(Role.CLIENT).post("/api/v1/builds", json={"drvs": [drvs.top]})
    assert resp.status_code == 201, resp.text
    return int(resp.json()["id"])


async def _build_json(runner: RunnerHarness, build_id: int) -> dict[str, Any]:
    resp = await runner.client(Role.CLIENT).get(f"/api/v1/builds/{build_id}")
    body: dict[str, Any] = resp.json()
    return body


def _browser(runner: RunnerHarness) -> httpx.AsyncClient:
    """A client without credentials that keeps cookies, as a browser would."""
    return runner.client(None)


async def _sign_in(runner: RunnerHarness, role: Role) -> httpx.AsyncClient:
    c = _browser(runner)
    resp = await c.post(
        "/login", data={"token": runner.tokens[role], "next": "/"}, headers={"Origin": ORIGIN}
    )
    assert resp.status_code == 303, resp.text
    return c


async def _stored_token(runner: RunnerHarness, name: str, role: Role = Role.CLIENT) -> str:
    """A new token made through the admin API."""
    resp = await runner.client(Role.ADMIN).post("/api/v1/tokens", json={"role": role, "name": name})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["token"])


async def _sign_in_as(runner: RunnerHarness, token: str) -> httpx.AsyncClient:
    c = _browser(runner)
    resp = await c.post("/login", data={"token": token, "next": "/"}, headers={"Origin": ORIGIN})
    assert resp.status_code == 303, resp.text
    return c


async def _csrf(c: httpx.AsyncClient, page: str) -> str:
    m = CSRF.search((await c.get(page)).text)
    assert m is not None, "the page has no form with a CSRF token"
    return m.group(1)


@pytest.mark.nix
async def test_actions_need_an_admin_a_csrf_token_and_the_same_origin(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner()
    build_id = await _build(runner, nix, drvs)
    cancel = f"/builds/{build_id}/cancel"

    anonymous = _browser(runner)
    resp = await anonymous.post(cancel, data={}, headers={"Origin": ORIGIN})
    assert resp.status_code == 401
    assert "client or admin token" in resp.text
    assert "Cancel build" not in (await anonymous.get(f"/builds/{build_id}")).text

    # Another client's build: no buttons, and a forged form is refused (the API's rule).
    client = await _sign_in_as(runner, await _stored_token(runner, "someone-else"))
    assert "Cancel build" not in (await client.get(f"/builds/{build_id}")).text
    token = await _csrf(client, "/")  # the sign-out form carries one
    resp = await client.post(cancel, data={"csrf": token}, headers={"Origin": ORIGIN})
    assert resp.status_code == 403
    assert f"may not cancel build {build_id}" in resp.text
    assert (await _build_json(runner, build_id))["events"] == []

    admin = await _sign_in(runner, Role.ADMIN)
    token = await _csrf(admin, f"/builds/{build_id}")
    refused = [
        ({}, {"Origin": ORIGIN}),  # no CSRF token
        ({"csrf": "x" + token}, {"Origin": ORIGIN}),  # a wrong one
        ({"csrf": token}, {"Origin": "http://evil.example"}),  # another site's form
        ({"csrf": token}, {"Origin": "null"}),
        ({"csrf": token}, {}),  # neither Origin nor Referer
        ({"csrf": token}, {"Referer": "http://evil.example/page"}),
    ]
    for form, headers in refused:
        resp = await admin.post(cancel, data=form, headers=headers)
        assert resp.status_code == 403, (form, headers)
        assert (await _build_json(runner, build_id))["state"] == "queued"
    # Another session's token is no good either.
    other = await _csrf(await _sign_in(runner, Role.ADMIN), f"/builds/{build_id}")
    resp = await admin.post(cancel, data={"csrf": other}, headers={"Origin": ORIGIN})
    assert resp.status_code == 403

    # A script with an admin bearer token needs no CSRF token (no browser sends one).
    bearer = runner.client(Role.ADMIN)
    resp = await bearer.post(f"/builds/{build_id}/bump", data={"priority": "7"})
    assert resp.status_code == 303
    assert (await _build_json(runner, build_id))["priority"] == 7
    resp = await admin.post(
        f"/builds/{build_id}/bump",
        data={"csrf": token, "priority": "x"},
        headers={"Origin": ORIGIN},
    )
    assert resp.status_code == 400 and "whole number" in resp.text

    # With the token, from the dashboard's own page: it works.
    resp = await admin.post(cancel, data={"csrf": token}, headers={"Origin": ORIGIN})
    assert resp.status_code == 303
    assert resp.headers["location"] == f"/builds/{build_id}"
    assert (await _build_json(runner, build_id))["state"] == "cancelled"
    resp = await admin.post(
        f"/builds/{build_id}/restart",
        data={"csrf": token},
        headers={"Referer": f"{ORIGIN}/builds/{build_id}"},  # no Origin: the Referer decides
    )
    assert resp.status_code == 303
    assert (await _build_json(runner, build_id))["state"] == "queued"
    resp = await admin.post("/builds/999/cancel", data={"csrf": token}, headers={"Origin": ORIGIN})
    assert resp.status_code == 404


async def test_token_mode_needs_a_sign_in_with_a_cookie_only_this_site_sends(
    make_runner: MakeRunner,
) -> None:
    runner = await make_runner(runner={"dashboard_auth": "token"})
    browser = _browser(runner)
    resp = await browser.get("/agents?x=1")
    assert resp.status_code == 303
    assert resp.headers["location"] == "/login?next=%2Fagents%3Fx%3D1"
    for path in ("/", "/search?q=abc", "/steps/1", "/steps/1/log", "/steps/1/events"):
        assert (await browser.get(path)).status_code == 303, path
    assert (await browser.get("/login")).status_code == 200

    # A bearer token of any role reads; a wrong one is refused.
    assert (await runner.client(Role.AGENT).get("/")).status_code == 200
    resp = await runner.client(None, token="bt_wrong").get("/")
    assert resp.status_code == 401

    # Signing in: a wrong token, a form from elsewhere, then the real thing.
    resp = await browser.post("/login", data={"token": "bt_nope"}, headers={"Origin": ORIGIN})
    assert resp.status_code == 401 and "not valid" in resp.text
    resp = await browser.post(
        "/login",
        data={"token": runner.tokens[Role.CLIENT]},
        headers={"Origin": "http://evil.example"},
    )
    assert resp.status_code == 403
    assert SESSION_COOKIE not in browser.cookies
    resp = await browser.post(
        "/login",
        data={"token": runner.tokens[Role.CLIENT], "next": "//evil.example/x"},
        headers={"Origin": ORIGIN},
    )
    assert resp.status_code == 303
    assert resp.headers["location"] == "/"  # never off-site
    cookie = resp.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert runner.tokens[Role.CLIENT].lower() not in cookie  # only a session id
    page = await browser.get("/")
    assert page.status_code == 200
    assert "client-token (client)" in page.text

    # Signing out ends the session.
    token = await _csrf(browser, "/")
    resp = await browser.post("/logout", data={"csrf": token}, headers={"Origin": ORIGIN})
    assert resp.status_code == 303
    assert (await browser.get("/")).status_code == 303


async def test_revoking_a_token_ends_its_dashboard_sessions(make_runner: MakeRunner) -> None:
    runner = await make_runner(runner={"dashboard_auth": "token"})
    admin = runner.client(Role.ADMIN)
    made = (await admin.post("/api/v1/tokens", json={"role": "client", "name": "viewer"})).json()
    browser = _browser(runner)
    resp = await browser.post("/login", data={"token": made["token"]}, headers={"Origin": ORIGIN})
    assert resp.status_code == 303
    assert (await browser.get("/")).status_code == 200
    assert (await admin.delete("/api/v1/tokens/viewer")).status_code == 200
    assert (await browser.get("/")).status_code == 303


async def test_public_mode_reads_without_a_token_and_has_security_headers(
    make_runner: MakeRunner,
) -> None:
    runner = await make_runner()
    resp = await _browser(runner).get("/")
    assert resp.status_code == 200
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert resp.headers["x-frame-options"] == "DENY"
    js = await _browser(runner).get("/static/htmx.min.js")
    assert js.status_code == 200 and "htmx" in js.text[:200]
    missing = await _browser(runner).get("/builds/12345")
    assert missing.status_code == 404 and "no build 12345" in missing.text
    assert missing.headers["content-type"].startswith("text/html")


async def test_the_agents_page_lists_the_autoscalers_launches(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    async with runner.comps.engine.begin() as conn:
        await queries.insert_launch(conn, "launch-abc123", "gha-pool", "pending", 1000.0)
    page = await _browser(runner).get("/agents")
    assert page.status_code == 200
    section = page.text[page.text.index('id="launches"') :]
    assert "launch-abc123" in section and "gha-pool" in section and "pending" in section
    assert "No autoscaler launches." not in section


# ---- live logs -------------------------------------------------------------------------------
@dataclass
class Viewer:
    """One EventSource-like reader of a step's events."""

    events: list[tuple[str, str, str | None]] = field(default_factory=list)
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    def text(self) -> str:
        import json

        return "".join(json.loads(d) for e, d, _ in self.events if e == "log")

    def ended(self) -> bool:
        return any(e == "end" for e, _, _ in self.events)


async def _follow(
    c: httpx.AsyncClient, url: str, viewer: Viewer, headers: dict[str, str] | None = None
) -> None:
    async with c.stream("GET", url, headers=headers or {}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        viewer.opened.set()
        event, eid = "message", None
        data: list[str] = []
        async for line in resp.aiter_lines():
            if line == "":
                if data:
                    viewer.events.append((event, "\n".join(data), eid))
                    if event == "end":
                        return
                event, data = "message", []
            elif line.startswith(":") or line.startswith("retry:"):
                continue
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line.startswith("id:"):
                eid = line[3:].strip()


@contextlib.asynccontextmanager
async def _viewers(
    runner: RunnerHarness, url: str, n: int, headers: dict[str, str] | None = None
) -> AsyncIterator[list[Viewer]]:
    viewers = [Viewer() for _ in range(n)]
    tasks = [asyncio.create_task(_follow(runner.client(None), url, v, headers)) for v in viewers]
    try:
        await eventually(lambda: all(v.opened.is_set() for v in viewers))
        yield viewers
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT_SECS)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.nix
async def test_live_log_reaches_many_viewers_from_one_producer(
    make_runner: MakeRunner,
    nix: Nix,
    drvs: Drvs,
    nix_system: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = await make_runner(serve=True)
    await _build(runner, nix, drvs)
    logs = runner.comps.logs
    reads = 0
    original = logs.iter_stored

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(logs, "iter_stored", counting)
    async with agent_socket(runner) as ws:
        await register(runner, ws, nix_system)
        assign = await receive_until(ws, p.Assign)
        step, lease = int(assign.step_id), assign.lease_id
        await ws.send(p.encode(p.Accepted(step_id=assign.step_id, lease_id=lease)))
        await ws.send(p.encode(p.Log(step_id=assign.step_id, lease_id=lease, lines=["first line"])))
        await eventually(lambda: logs.size(step) > 0)
        url = f"/steps/{step}/events"
        async with _viewers(runner, url, 5) as viewers:
            await eventually(lambda: all("first line\n" in v.text() for v in viewers))
            assert logs.fanout.viewers(step) == 5
            reads_before = reads
            for i in range(30):
                await ws.send(
                    p.encode(p.Log(step_id=assign.step_id, lease_id=lease, lines=[f"line {i}"]))
                )
            await eventually(lambda: all("line 29\n" in v.text() for v in viewers))
            # Following the log read nothing back from the store: the lines came from the
            # one producer, fanned out.
            assert reads == reads_before
            # The admin drains the agent from the dashboard (a script, with a bearer token).
            resp = await runner.client(Role.ADMIN).post(f"/agents/{assign_machine(runner)}/drain")
            assert resp.status_code == 303
            await receive_until(ws, p.Drain)
            await ws.send(
                p.encode(
                    p.Result(
                        step_id=assign.step_id,
                        lease_id=lease,
                        outcome=p.Outcome.BUILD_FAILURE,
                        exit_code=1,
                        error="failed on purpose",
                    )
                )
            )
        want = "first line\n" + "".join(f"line {i}\n" for i in range(30))
        for v in viewers:
            assert v.text() == want  # every line once, in order
            assert v.events[-1][0] == "end"
            assert '"failed"' in v.events[-1][1]
        assert logs.fanout.viewers(step) == 0

        # A viewer that comes back with Last-Event-ID gets only what it missed.
        offset = len(b"first line\nline 0\n")
        async with _viewers(runner, url, 1, {"Last-Event-ID": str(offset)}) as [late]:
            pass
        assert late.text() == want[offset:]
        assert late.ended()

        # The API serves the stored (compressed) log by range.
        api = runner.client(Role.CLIENT)
        part = await api.get(f"/api/v1/steps/{step}/log", headers={"Range": "bytes=11-17"})
        assert part.status_code == 206
        assert part.text == "line 0\n"
        assert part.headers["content-range"] == f"bytes 11-17/{len(want)}"
        whole = await api.get(f"/api/v1/steps/{step}/log")
        assert whole.status_code == 200 and whole.text == want
        assert whole.headers["accept-ranges"] == "bytes"
        beyond = await api.get(
            f"/api/v1/steps/{step}/log", headers={"Range": f"bytes={len(want)}-"}
        )
        assert beyond.status_code == 416
        assert beyond.headers["content-range"] == f"bytes */{len(want)}"
        assert logs.path(step).exists() and logs.path(step).read_bytes()[:4] == b"\x28\xb5\x2f\xfd"


def assign_machine(runner: RunnerHarness) -> str:
    [machine_id] = list(runner.comps.scheduler.venues)
    return machine_id


@pytest.mark.nix
async def test_a_viewer_that_falls_behind_is_dropped_and_resumes_where_it_was(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = await make_runner()
    await _build(runner, nix, drvs)
    step = next(iter(runner.comps.scheduler.nodes))
    fanout = LogFanout(subscriber_max_bytes=16)
    logs = LogStore(runner.state_dir / "other-logs", 1 << 20, fanout)
    monkeypatch.setattr(runner.comps, "logs", logs)
    logs.append(step, ["stored"])
    sub = fanout.subscribe(step)
    stream = logstream.log_events(runner.comps, step, 0, sub)
    assert (await anext(stream)).startswith("retry:")
    assert '"stored\\n"' in await anext(stream)
    logs.append(step, ["0123456789", "abcdefghij"])  # 22 bytes: more than it may hold
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), WAIT_SECS)  # ends: the browser reconnects
    assert fanout.viewers(step) == 0
    # Reconnecting from the offset it reached (7): the rest, from the stored log.
    again = logstream.log_events(runner.comps, step, 7, fanout.subscribe(step))
    assert (await anext(again)).startswith("retry:")
    event = await anext(again)
    assert '"0123456789\\nabcdefghij\\n"' in event and "id: 29" in event
    await again.aclose()
    assert fanout.viewers(step) == 0
    logs.close_all()


async def test_a_runner_without_tokens_still_wants_the_csrf_token(
    tmp_path: Path, database_url: str
) -> None:
    """No tokens at all: everyone is an admin (as on the API), but a form must still carry
    the CSRF token of the session the dashboard gave the browser."""
    (tmp_path / "cache.sk").write_text(generate_key("open-1").to_text())
    config = load_runner_config(
        None,
        runner={"state_dir": str(tmp_path), "listen": "127.0.0.1:0"},
        cache={"signing_key_file": str(tmp_path / "cache.sk")},
        database={"url": database_url},
    )
    comps = await build_components(config)
    app = create_app(comps)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ORIGIN) as c:
            page = await c.get("/agents")
            assert page.status_code == 200
            assert "Sign in" not in page.text
            session = app.state.dashboard.sessions.get(c.cookies.get(SESSION_COOKIE))
            assert session is not None and session.token_digest is None
            resp = await c.post("/builds/1/cancel", data={}, headers={"Origin": ORIGIN})
            assert resp.status_code == 403
            resp = await c.post(
                "/builds/1/cancel", data={"csrf": session.csrf}, headers={"Origin": ORIGIN}
            )
            assert resp.status_code == 404  # allowed: then there is no build 1
            # Polling pages reuse the session rather than making new ones.
            await c.get("/")
            assert len(app.state.dashboard.sessions) == 1
    finally:
        await close_components(comps)


@pytest.mark.nix
async def test_a_client_acts_on_its_own_build_and_the_history_shows_who(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner = await make_runner()
    build_id = await _build(runner, nix, drvs)  # by the client token
    owner = await _sign_in(runner, Role.CLIENT)
    page = (await owner.get(f"/builds/{build_id}")).text
    assert "Cancel build" in page and "Nobody has cancelled" in page
    token = await _csrf(owner, f"/builds/{build_id}")
    for action, form in (("bump", {"priority": "3"}), ("cancel", {})):
        resp = await owner.post(
            f"/builds/{build_id}/{action}", data={"csrf": token} | form, headers={"Origin": ORIGIN}
        )
        assert resp.status_code == 303, resp.text
    build = await _build_json(runner, build_id)
    assert (build["state"], build["priority"]) == ("cancelled", 3)
    name = build["created_by"]
    assert [(e["kind"], e["actor"]) for e in build["events"]] == [
        ("bumped", name),
        ("cancelled", name),
    ]
    page = (await owner.get(f"/builds/{build_id}")).text
    history = page[page.index('id="events"') :]
    assert f"<td>bumped</td><td>{name}</td>" in history
    assert f"<td>cancelled</td><td>{name}</td>" in history
    # An agent token signed in may look but not act, even on a build of its name.
    agent = await _sign_in(runner, Role.AGENT)
    resp = await agent.post(
        f"/builds/{build_id}/restart",
        data={"csrf": await _csrf(agent, "/")},
        headers={"Origin": ORIGIN},
    )
    assert resp.status_code == 403
    assert len((await _build_json(runner, build_id))["events"]) == 2


async def test_the_builds_page_says_what_is_wrong_with_its_query(make_runner: MakeRunner) -> None:
    runner = await make_runner()
    c = _browser(runner)
    for query, message in (
        ("state=bogus", "unknown build state &#39;bogus&#39;"),
        ("limit=ten", "limit must be a whole number"),
        ("before=-5", "before must be a whole number"),
    ):
        resp = await c.get(f"/builds?{query}")
        assert resp.status_code == 400, query
        assert resp.headers["content-type"].startswith("text/html")
        assert message in resp.text, resp.text
    # Bounds are clamped, not refused; a filter longer than any stored value matches nothing.
    resp = await c.get("/builds", params={"limit": "100000", "repository": "x" * 5000})
    assert resp.status_code == 200 and 'id="all-builds-empty"' in resp.text
    assert 'id="filter-repository" value="' + "x" * 256 + '"' in resp.text
