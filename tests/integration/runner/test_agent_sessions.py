"""The agent WebSocket under a real uvicorn: credentials are checked before the upgrade,
protocol violations get an ``error`` and a close without disturbing other agents, and a
registered agent is told the cache and receives work."""

from __future__ import annotations

import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bigtent import protocol as p
from bigtent.config import Role
from tests.integration.runner.conftest import (
    Drvs,
    MakeRunner,
    Nix,
    RunnerHarness,
    agent_socket,
    eventually,
    receive,
    receive_until,
    register,
    register_message,
    upload_closure,
)


@pytest.mark.parametrize(
    ("authorization", "status"),
    [(None, 401), ("Bearer bt_not-a-token", 401), ("Basic abc", 401), (Role.CLIENT, 403)],
)
async def test_auth_is_refused_before_the_upgrade(
    make_runner: MakeRunner, authorization: str | Role | None, status: int
) -> None:
    runner = await make_runner(serve=True)
    headers = {}
    if isinstance(authorization, Role):
        headers["Authorization"] = f"Bearer {runner.tokens[authorization]}"
    elif authorization is not None:
        headers["Authorization"] = authorization
    with pytest.raises(InvalidStatus) as caught:
        async with connect(runner.ws_url, additional_headers=headers, proxy=None):
            pass
    response = caught.value.response
    assert response.status_code == status
    body = json.loads(response.body or b"{}")
    assert set(body) == {"error", "detail"}
    for token in runner.tokens.values():
        assert token.encode() not in (response.body or b"")
    assert runner.comps.sessions.live == {}


async def _assert_good_agent_still_served(runner: RunnerHarness, system: str) -> None:
    async with agent_socket(runner) as ws:
        await register(runner, ws, system)


_BAD_FIRST_MESSAGES = {
    # case: (message, what the error says)
    "garbage": ("{this is not json", "invalid json"),
    "not-an-object": ("[1, 2, 3]", "invalid message"),
    "unknown-type": (json.dumps({"type": "launch_missiles"}), "launch_missiles"),
    "no-type": (json.dumps({"machine_id": "m"}), "type"),
    "too-large": (
        json.dumps({"type": "register", "pad": "x" * (p.MAX_MESSAGE_BYTES + 1)}),
        "exceeds",
    ),
    "too-large-in-bytes": (
        json.dumps(
            {"type": "register", "pad": "é" * (p.MAX_MESSAGE_BYTES // 2 + 1)}, ensure_ascii=False
        ),
        "exceeds",
    ),
    "not-register": (json.dumps({"type": "heartbeat"}), "expected register"),
    "invalid-register": (
        json.dumps({"type": "register", "machine_id": "m", "max_jobs": 0}),
        "invalid message",
    ),
    "wrong-protocol": ("", "protocol"),  # built below: a register speaking another version
    "name-too-long": ("", "name longer"),
}


@pytest.mark.parametrize("case", sorted(_BAD_FIRST_MESSAGES))
async def test_bad_first_message_gets_error_then_close(
    make_runner: MakeRunner, nix_system: str, case: str
) -> None:
    runner = await make_runner(serve=True)
    text, says = _BAD_FIRST_MESSAGES[case]
    if case == "wrong-protocol":
        text = p.encode(register_message(nix_system, proto="bigtent/0"))
    elif case == "name-too-long":
        text = p.encode(register_message(nix_system, name="é" * p.MAX_NAME_CHARS))
    async with agent_socket(runner) as ws:
        await ws.send(text)
        msg = await receive(ws)
        assert isinstance(msg, p.Error), msg
        assert says in msg.message.lower(), msg.message
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert runner.comps.sessions.live == {}
    await _assert_good_agent_still_served(runner, nix_system)


@pytest.mark.parametrize(
    "case", ["garbage", "unknown-type", "register-again", "too-large", "binary-garbage"]
)
async def test_bad_message_after_register_gets_error_then_close(
    make_runner: MakeRunner, nix_system: str, case: str
) -> None:
    runner = await make_runner(serve=True)
    async with agent_socket(runner) as other:
        await register(runner, other, nix_system)
        async with agent_socket(runner) as ws:
            await register(runner, ws, nix_system)
            assert len(runner.comps.sessions.live) == 2
            messages: dict[str, str | bytes] = {
                "garbage": "nope",
                "unknown-type": json.dumps({"type": "bogus", "step_id": 1}),
                "register-again": p.encode(register_message(nix_system)),
                "too-large": json.dumps({"type": "heartbeat", "x": "y" * p.MAX_MESSAGE_BYTES}),
                "binary-garbage": b"\xff\xfe\x00",
            }
            await ws.send(messages[case])
            msg = await receive_until(ws, p.Error)
            assert msg.message
            with pytest.raises(ConnectionClosed):
                await receive(ws)
        await eventually(lambda: len(runner.comps.sessions.live) == 1)
        # The other agent's session is untouched and still answered.
        await other.send(p.encode(p.Heartbeat()))
        await other.send(
            p.encode(
                p.Result(step_id=p.StepId(1), lease_id=p.LeaseId("x"), outcome=p.Outcome.SUCCESS)
            )
        )
        ack = await receive_until(other, p.ResultAck)
        assert ack.recorded is False


async def test_register_gets_cache_url_and_key(make_runner: MakeRunner, nix_system: str) -> None:
    runner = await make_runner(serve=True)
    async with agent_socket(runner) as ws:
        reg = register_message(nix_system, name="build-01", supported_features=["kvm"])
        await ws.send(p.encode(reg))
        msg = await receive(ws)
        assert isinstance(msg, p.Registered)
        assert msg.proto == p.PROTOCOL_VERSION
        assert msg.cache_url == f"{runner.url}/cache"
        assert msg.cache_public_key == runner.key.public_key().to_text()
        assert msg.lease_secs == runner.comps.config.scheduler.lease_secs
        agents = (await runner.client(Role.CLIENT).get("/api/v1/agents")).json()["agents"]
        (agent,) = agents
        assert agent["name"] == "build-01" and agent["connected"] is True
        assert agent["supported_features"] == ["kvm"]
    await eventually(lambda: runner.comps.sessions.live == {})


@pytest.mark.nix
async def test_assign_arrives_for_a_runnable_step(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, nix_system: str
) -> None:
    runner = await make_runner(serve=True)
    await upload_closure(runner, nix, drvs.closure)
    client = runner.client(Role.CLIENT)
    build = (await client.post("/api/v1/builds", json={"drvs": [drvs.top]})).json()
    async with agent_socket(runner) as ws:
        await register(runner, ws, nix_system)
        assign = await receive_until(ws, p.Assign)
        assert assign.drv_path == drvs.dep
        assert assign.outputs == nix.outputs(drvs.dep)
        assert assign.upload_urls == {
            "out": f"/api/v1/agent/upload/{assign.lease_id}/out",
        }
        steps = (await client.get(f"/api/v1/builds/{build['id']}/steps")).json()["steps"]
        dep = next(s for s in steps if s["drv_path"] == drvs.dep)
        assert dep["id"] == assign.step_id
        assert dep["state"] == "assigned"


async def test_a_registration_overtaken_by_a_newer_session_does_not_detach_it(
    make_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session A of machine M waits on its database write; meanwhile session B of M
    registers. When A resumes it must not attach over B (nor, when it ends, detach B)."""
    import asyncio

    from bigtent.runner.db import queries

    runner = await make_runner(serve=True)
    real_upsert = queries.upsert_agent
    first_waiting = asyncio.Event()
    release_first = asyncio.Event()
    calls = 0

    async def slow_first(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            first_waiting.set()
            await release_first.wait()
        return await real_upsert(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(queries, "upsert_agent", slow_first)
    sessions = runner.comps.sessions
    real_ended = sessions._ended
    ended = 0
    first_ended = asyncio.Event()

    async def counting_ended(session: object) -> None:
        nonlocal ended
        await real_ended(session)  # type: ignore[arg-type]
        ended += 1
        first_ended.set()

    monkeypatch.setattr(sessions, "_ended", counting_ended)
    reg = register_message("x86_64-linux")
    async with agent_socket(runner) as a:
        await a.send(p.encode(reg))
        await asyncio.wait_for(first_waiting.wait(), 10)
        async with agent_socket(runner) as b:
            await b.send(p.encode(reg))
            assert isinstance(await receive(b), p.Registered)
            release_first.set()
            # A was replaced: once its handler has ended, B is still the live, attached venue.
            await asyncio.wait_for(first_ended.wait(), 10)
            assert ended == 1
            live = sessions.live[reg.machine_id]
            venue = runner.comps.scheduler.venues.get(reg.machine_id)
            assert venue is not None and venue is live.venue


async def test_a_heartbeat_saying_draining_stops_assignments(make_runner: MakeRunner) -> None:
    runner = await make_runner(serve=True)
    reg = register_message("x86_64-linux")
    async with agent_socket(runner) as ws:
        await ws.send(p.encode(reg))
        assert isinstance(await receive(ws), p.Registered)
        venue = runner.comps.scheduler.venues[reg.machine_id]
        assert venue.available(runner.comps.scheduler.clock())
        await ws.send(p.encode(p.Heartbeat(draining=True)))
        await eventually(lambda: venue.draining)
        assert not venue.available(runner.comps.scheduler.clock())


async def test_the_session_is_not_compressed_per_message(make_runner: MakeRunner) -> None:
    """The agent's client offers permessage-deflate (websockets does by default); the runner
    declines it, and the session works uncompressed."""
    runner = await make_runner(serve=True)
    async with agent_socket(runner) as ws:
        assert ws.request is not None and ws.response is not None
        assert "permessage-deflate" in (ws.request.headers.get("Sec-WebSocket-Extensions") or "")
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        assert ws.protocol.extensions == []
        await register(runner, ws, "x86_64-linux")
