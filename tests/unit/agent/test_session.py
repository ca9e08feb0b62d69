"""The agent session against an in-process fake runner (a real websockets server on loopback)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bigtent.agent.backlog import STEP_LIMIT_CHARS, lost_marker
from bigtent.agent.connection import Connection, websocket_connector
from bigtent.agent.identity import AgentIdentity
from bigtent.agent.link import EXIT_AUTH_REFUSED
from bigtent.agent.session import AgentSession
from bigtent.agent.stepstore import CacheSettings
from bigtent.config import AgentSection
from bigtent.errors import ConfigError, CredentialUnavailable, RunnerUnreachable
from bigtent.nix.store import NixStore
from bigtent.protocol import (
    Abort,
    Accepted,
    AgentMessage,
    Assign,
    Drain,
    Error,
    Heartbeat,
    LeaseId,
    Log,
    MachineId,
    Outcome,
    Refused,
    Register,
    Registered,
    Result,
    ResultAck,
    StepId,
    encode,
    parse_agent_message,
)
from bigtent.storebudget import StoreBudget, StoreCollector

WAIT = 5.0
M = TypeVar("M")


# ---- fakes ------------------------------------------------------------------------------
@dataclass
class RunnerSide:
    """The runner's end of one agent session."""

    ws: ServerConnection
    register: Register
    inbox: asyncio.Queue[AgentMessage] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, message: Any) -> None:
        await self.ws.send(encode(message))

    async def expect(self, kind: type[M], timeout: float = WAIT) -> M:
        """The next message of ``kind``, skipping heartbeats and logs."""
        while True:
            message = await asyncio.wait_for(self.inbox.get(), timeout)
            if isinstance(message, kind):
                return message
            if not isinstance(message, Heartbeat | Log):
                raise AssertionError(f"expected {kind.__name__}, got {message!r}")

    async def until_result(self, timeout: float = WAIT) -> list[AgentMessage]:
        """Every message up to and including the next ``result``, heartbeats left out."""
        messages: list[AgentMessage] = []
        while not messages or not isinstance(messages[-1], Result):
            message = await asyncio.wait_for(self.inbox.get(), timeout)
            if not isinstance(message, Heartbeat):
                messages.append(message)
        return messages

    async def assign(self, step_id: int, lease: str = "") -> None:
        await self.send(
            Assign(
                step_id=StepId(step_id),
                lease_id=LeaseId(lease or f"lease-{step_id}"),
                drv_path=f"/nix/store/{'a' * 32}-s{step_id}.drv",
                outputs={"out": f"/nix/store/{'b' * 32}-s{step_id}"},
                upload_urls={"out": f"/api/v1/agent/upload/lease-{step_id}/out"},
                timeout_secs=60,
                max_silent_secs=60,
                max_log_bytes=1 << 20,
            )
        )


class FakeRunner:
    """Speaks protocol.py over a real WebSocket; refuses the upgrade when ``status`` is set."""

    def __init__(
        self,
        *,
        status: int | None = None,
        heartbeat_secs: float = 60.0,
        keep_running: list[int] | None = None,
        untrusted: bool = False,
    ) -> None:
        self.untrusted = untrusted
        """What ``registered`` says about the agent's trust."""
        self.status = status
        self.heartbeat_secs = heartbeat_secs
        self.keep_running = keep_running
        self.sessions: asyncio.Queue[RunnerSide] = asyncio.Queue()
        self.auth_headers: list[str | None] = []
        self.url = ""
        self._server: Server | None = None

    async def __aenter__(self) -> FakeRunner:
        self._server = await serve(
            self._handler, "127.0.0.1", 0, process_request=self._process_request
        )
        port = next(iter(self._server.sockets)).getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        self.auth_headers.append(request.headers.get("Authorization"))
        if request.path != "/api/v1/agent/ws":
            return conn.respond(404, "not found\n")
        if self.status is not None:
            return conn.respond(self.status, '{"error": "unknown token"}')
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        register = parse_agent_message(await ws.recv())
        assert isinstance(register, Register)
        keep = self.keep_running
        if keep is None:
            keep = [r.step_id for r in register.running]
        await ws.send(
            encode(
                Registered(
                    session_id="s",
                    heartbeat_secs=self.heartbeat_secs,
                    lease_secs=60,
                    cache_url="/cache",
                    cache_public_key="test-1:key",
                    keep_running=[StepId(k) for k in keep],
                    untrusted=self.untrusted,
                )
            )
        )
        side = RunnerSide(ws, register)
        await self.sessions.put(side)
        try:
            async for raw in ws:
                await side.inbox.put(parse_agent_message(raw))
        except ConnectionClosed:
            pass
        finally:
            side.closed.set()

    async def next_session(self) -> RunnerSide:
        return await asyncio.wait_for(self.sessions.get(), WAIT)


@dataclass
class FakeStep:
    assign: Assign
    cache: CacheSettings
    send_log: Callable[[Log], Awaitable[object]]
    abort: asyncio.Event
    release: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: Outcome = Outcome.SUCCESS


class FakeExecutor:
    """Runs no Nix: a step ends when the test releases it or the session aborts it."""

    def __init__(self) -> None:
        self.started: asyncio.Queue[FakeStep] = asyncio.Queue()

    async def run(
        self,
        assign: Assign,
        cache: CacheSettings,
        *,
        send_log: Callable[[Log], Awaitable[object]],
        abort: asyncio.Event,
    ) -> Result:
        step = FakeStep(assign, cache, send_log, abort)
        await self.started.put(step)
        release = asyncio.ensure_future(step.release.wait())
        aborted = asyncio.ensure_future(abort.wait())
        try:
            await asyncio.wait({release, aborted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            release.cancel()
            aborted.cancel()
            await asyncio.wait({release, aborted})
        outcome = Outcome.ABORTED if abort.is_set() else step.outcome
        step.finished.set()
        return Result(step_id=assign.step_id, lease_id=assign.lease_id, outcome=outcome)

    async def next_step(self) -> FakeStep:
        return await asyncio.wait_for(self.started.get(), WAIT)


@dataclass
class Agent:
    session: AgentSession
    executor: FakeExecutor
    task: asyncio.Task[int]

    async def exit_code(self) -> int:
        return await asyncio.wait_for(asyncio.shield(self.task), WAIT)


@pytest.fixture
async def start_agent(tmp_path: Path) -> AsyncIterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def start(
        runner: FakeRunner,
        *,
        token: str | None = "secret",
        collector: StoreCollector | None = None,
        **section: Any,
    ) -> Agent:
        cfg = AgentSection(runner_url=runner.url, work_dir=tmp_path, **section)
        identity = AgentIdentity(MachineId("m-1"), "agent-1", "host-1", ("x86_64-linux",))
        executor = FakeExecutor()
        session = AgentSession(
            cfg,
            identity,
            token=token,
            connect=websocket_connector(),
            executor=executor,
            rand=lambda: 0.0,
            store_dir=tmp_path,
            collector=collector,
        )
        agent = Agent(session, executor, asyncio.create_task(session.run()))
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        if not agent.task.done():
            agent.task.cancel()
        await asyncio.gather(agent.task, return_exceptions=True)


# ---- tests ------------------------------------------------------------------------------
async def test_register_carries_identity_and_token(start_agent: Callable[..., Agent]) -> None:
    async with FakeRunner() as runner:
        start_agent(runner, max_jobs=3, supported_features=["kvm"])
        side = await runner.next_session()
        reg = side.register
        assert (reg.machine_id, reg.name, reg.hostname) == ("m-1", "agent-1", "host-1")
        assert reg.systems == ["x86_64-linux"]
        assert reg.supported_features == ["kvm"]
        assert reg.max_jobs == 3
        assert reg.ephemeral is False
        assert reg.running == []
        assert runner.auth_headers == ["Bearer secret"]


async def test_an_untrusted_agent_says_so_and_serves_when_confirmed(
    start_agent: Callable[..., Agent],
) -> None:
    async with FakeRunner(untrusted=True) as runner:
        agent = start_agent(runner, untrusted=True)
        side = await runner.next_session()
        assert side.register.untrusted is True
        await side.assign(1)
        assert (await side.expect(Accepted)).step_id == 1
        assert not agent.task.done()


async def test_an_untrusted_agent_stops_when_the_runner_does_not_confirm(
    start_agent: Callable[..., Agent],
) -> None:
    # An older runner ignores the request and would send trusted work: the agent must stop
    # (an error, not a reconnect loop) rather than build it.
    async with FakeRunner(untrusted=False) as runner:
        agent = start_agent(runner, untrusted=True)
        with pytest.raises(ConfigError, match="did not accept this agent as untrusted"):
            await agent.exit_code()


async def test_assign_when_full_is_refused(start_agent: Callable[..., Agent]) -> None:
    async with FakeRunner() as runner:
        agent = start_agent(runner, max_jobs=1)
        side = await runner.next_session()
        await side.assign(1)
        accepted = await side.expect(Accepted)
        assert (accepted.step_id, accepted.lease_id) == (1, "lease-1")
        step = await agent.executor.next_step()
        assert step.cache.cache_url == f"{runner.url}/cache"

        await side.assign(2)
        refused = await side.expect(Refused)
        assert refused.step_id == 2
        assert "no free slot" in refused.reason

        step.release.set()
        result = await side.expect(Result)
        assert (result.step_id, result.outcome) == (1, Outcome.SUCCESS)
        await side.send(ResultAck(step_id=StepId(1), lease_id=LeaseId("lease-1"), recorded=True))

        # The slot is free again.
        await side.assign(3)
        assert (await side.expect(Accepted)).step_id == 3
        assert agent.session.running == [3]


async def test_assign_of_a_held_step_is_refused(start_agent: Callable[..., Agent]) -> None:
    async with FakeRunner() as runner:
        start_agent(runner, max_jobs=2)
        side = await runner.next_session()
        await side.assign(1)
        await side.expect(Accepted)
        await side.assign(1)
        assert "already holds" in (await side.expect(Refused)).reason


async def test_drain_refuses_then_exits_when_idle(start_agent: Callable[..., Agent]) -> None:
    async with FakeRunner() as runner:
        agent = start_agent(runner, max_jobs=2)
        side = await runner.next_session()
        await side.assign(1)
        await side.expect(Accepted)
        step = await agent.executor.next_step()

        await side.send(Drain(reason="maintenance"))
        await side.assign(2)
        refused = await side.expect(Refused)
        assert refused.reason == "the agent is draining"
        assert not agent.task.done()

        step.release.set()
        await side.expect(Result)
        # Still waiting for the acknowledgement of its last result.
        assert not agent.task.done()
        await side.send(ResultAck(step_id=StepId(1), lease_id=LeaseId("lease-1"), recorded=True))
        assert await agent.exit_code() == 0
        await asyncio.wait_for(side.closed.wait(), WAIT)


async def test_drain_when_idle_exits_at_once(start_agent: Callable[..., Agent]) -> None:
    async with FakeRunner() as runner:
        agent = start_agent(runner)
        side = await runner.next_session()
        await side.send(Drain())
        assert await agent.exit_code() == 0


async def test_abort_reports_aborted(start_agent: Callable[..., Agent]) -> None:
    async with FakeRunner() as runner:
        agent = start_agent(runner)
        side = await runner.next_session()
        await side.assign(7)
        await side.expect(Accepted)
        step = await agent.executor.next_step()
        await side.send(Abort(step_id=StepId(7), reason="build cancelled"))
        await asyncio.wait_for(step.abort.wait(), WAIT)
        result = await side.expect(Result)
        assert (result.step_id, result.outcome) == (7, Outcome.ABORTED)


async def test_result_is_resent_after_reconnect(start_agent: Callable[..., Agent]) -> None:
    async with FakeRunner() as runner:
        agent = start_agent(runner)
        first = await runner.next_session()
        await first.assign(1)
        await first.expect(Accepted)
        step = await agent.executor.next_step()

        # The connection drops; the step finishes while the agent is away.
        await first.ws.close()
        await asyncio.wait_for(first.closed.wait(), WAIT)
        step.release.set()

        second = await runner.next_session()
        assert [(r.step_id, r.lease_id) for r in second.register.running] == [(1, "lease-1")]
        result = await second.expect(Result)
        assert (result.step_id, result.lease_id, result.outcome) == (1, "lease-1", "success")
        assert agent.session.pending_results == [1]
        await second.send(ResultAck(step_id=StepId(1), lease_id=LeaseId("lease-1"), recorded=True))
        await second.send(Drain())
        assert await agent.exit_code() == 0
        assert agent.session.pending_results == []


async def _outage(runner: FakeRunner, agent: Agent, side: RunnerSide) -> None:
    """Cut the session; the runner refuses the agent until the test sets ``status`` None."""
    runner.status = 503
    await side.ws.close()
    await asyncio.wait_for(side.closed.wait(), WAIT)
    for _ in range(int(WAIT / 0.01)):  # the agent notices the close
        if not agent.session.registered.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the agent did not notice the closed session")


def _log(step_id: int, *lines: str) -> Log:
    return Log(step_id=StepId(step_id), lease_id=LeaseId(f"lease-{step_id}"), lines=list(lines))


async def test_log_lines_from_an_outage_arrive_before_the_result(
    start_agent: Callable[..., Agent],
) -> None:
    async with FakeRunner() as runner:
        agent = start_agent(runner)
        first = await runner.next_session()
        await first.assign(1)
        await first.expect(Accepted)
        step = await agent.executor.next_step()
        assert await step.send_log(_log(1, "before"))
        assert (await first.expect(Log)).lines == ["before"]

        await _outage(runner, agent, first)
        assert not await step.send_log(_log(1, "during 1", "during 2"))
        assert not await step.send_log(_log(1, "during 3"))
        step.release.set()
        await asyncio.wait_for(step.finished.wait(), WAIT)
        runner.status = None

        second = await runner.next_session()
        messages = await second.until_result()
        assert [m.lines for m in messages if isinstance(m, Log)] == [
            ["during 1", "during 2", "during 3"]
        ]
        assert all(
            isinstance(m, Log | Result) and (m.step_id, m.lease_id) == (1, "lease-1")
            for m in messages
        )
        assert isinstance(messages[-1], Result) and messages[-1].outcome is Outcome.SUCCESS
        await second.send(ResultAck(step_id=StepId(1), lease_id=LeaseId("lease-1"), recorded=True))

        # A step still running after the reconnect sends its lines directly again.
        await second.assign(2)
        await second.expect(Accepted)
        step2 = await agent.executor.next_step()
        assert await step2.send_log(_log(2, "live"))
        assert (await second.expect(Log)).lines == ["live"]


async def test_log_lines_of_a_running_step_are_sent_after_the_reconnect(
    start_agent: Callable[..., Agent],
) -> None:
    async with FakeRunner() as runner:
        agent = start_agent(runner)
        first = await runner.next_session()
        await first.assign(1)
        await first.expect(Accepted)
        step = await agent.executor.next_step()
        await _outage(runner, agent, first)
        await step.send_log(_log(1, "while away"))
        runner.status = None

        second = await runner.next_session()
        assert (await second.expect(Log)).lines == ["while away"]
        assert await step.send_log(_log(1, "back"))
        step.release.set()
        messages = await second.until_result()
        assert [m.lines for m in messages if isinstance(m, Log)] == [["back"]]


async def test_log_backlog_is_bounded_and_says_what_was_lost(
    start_agent: Callable[..., Agent],
) -> None:
    line_chars = 1023  # costs 1 KiB in the backlog with its newline
    kept = STEP_LIMIT_CHARS // (line_chars + 1)
    total = kept + 476
    async with FakeRunner() as runner:
        agent = start_agent(runner)
        first = await runner.next_session()
        await first.assign(1)
        await first.expect(Accepted)
        step = await agent.executor.next_step()
        await _outage(runner, agent, first)
        lines = [f"{i:05d}".ljust(line_chars, ".") for i in range(total)]
        for start in range(0, total, 500):
            await step.send_log(_log(1, *lines[start : start + 500]))
        step.release.set()
        await asyncio.wait_for(step.finished.wait(), WAIT)
        runner.status = None

        second = await runner.next_session()
        messages = await second.until_result()
        received = [line for m in messages if isinstance(m, Log) for line in m.lines]
        assert received == [lost_marker(476), *lines[476:]]
        assert isinstance(messages[-1], Result)


async def test_log_backlog_of_a_step_the_runner_dropped_is_not_sent(
    start_agent: Callable[..., Agent],
) -> None:
    async with FakeRunner() as runner:
        agent = start_agent(runner, max_jobs=2)
        first = await runner.next_session()
        for sid in (1, 2):
            await first.assign(sid)
            await first.expect(Accepted)
        steps: dict[int, FakeStep] = {
            s.assign.step_id: s for s in [await agent.executor.next_step() for _ in "12"]
        }
        await _outage(runner, agent, first)
        await steps[1].send_log(_log(1, "of the dropped step"))
        await steps[2].send_log(_log(2, "of the kept step"))
        steps[2].release.set()
        await asyncio.wait_for(steps[2].finished.wait(), WAIT)
        runner.keep_running = [2]
        runner.status = None

        second = await runner.next_session()
        messages = await second.until_result()
        assert [(m.step_id, m.lines) for m in messages if isinstance(m, Log)] == [
            (2, ["of the kept step"])
        ]
        assert isinstance(messages[-1], Result) and messages[-1].step_id == 2
        await asyncio.wait_for(steps[1].finished.wait(), WAIT)
        assert steps[1].abort.is_set()
        await second.send(ResultAck(step_id=StepId(2), lease_id=LeaseId("lease-2"), recorded=True))
        await second.send(Drain())
        assert await agent.exit_code() == 0


async def test_step_keeps_running_across_reconnect(start_agent: Callable[..., Agent]) -> None:
    async with FakeRunner() as runner:
        agent = start_agent(runner)
        first = await runner.next_session()
        await first.assign(1)
        await first.expect(Accepted)
        step = await agent.executor.next_step()
        await first.ws.close()

        second = await runner.next_session()
        assert [r.step_id for r in second.register.running] == [1]
        assert not step.abort.is_set()
        # The slot is still taken.
        await second.assign(2)
        assert "no free slot" in (await second.expect(Refused)).reason
        step.release.set()
        assert (await second.expect(Result)).step_id == 1


async def test_step_whose_lease_was_dropped_is_aborted(start_agent: Callable[..., Agent]) -> None:
    async with FakeRunner(keep_running=[]) as runner:
        agent = start_agent(runner)
        first = await runner.next_session()
        await first.assign(1)
        await first.expect(Accepted)
        step = await agent.executor.next_step()
        await first.ws.close()

        second = await runner.next_session()
        assert [r.step_id for r in second.register.running] == [1]
        await asyncio.wait_for(step.finished.wait(), WAIT)
        assert step.abort.is_set()
        # Its result is not reported (the runner re-queued the step) and the slot is free.
        assert agent.session.running == []
        assert agent.session.pending_results == []
        await second.assign(2)
        assert (await second.expect(Accepted)).step_id == 2


async def test_heartbeats_name_held_steps(start_agent: Callable[..., Agent]) -> None:
    async with FakeRunner(heartbeat_secs=0.05) as runner:
        agent = start_agent(runner)
        side = await runner.next_session()
        await side.assign(4)
        await side.expect(Accepted)
        await agent.executor.next_step()
        for _ in range(100):
            message = await asyncio.wait_for(side.inbox.get(), WAIT)
            if isinstance(message, Heartbeat) and message.running == [4]:
                break
        else:
            raise AssertionError("no heartbeat named step 4")
        assert message.memory_total_bytes is None or message.memory_total_bytes > 0


class FakeGcStore:
    """Answers ``nix-store --gc`` as Nix does; the disk gets its bytes back."""

    def __init__(self, disk: dict[str, int]) -> None:
        self.disk = disk
        self.calls: list[list[str]] = []

    async def run(self, tool: str, args: list[str]) -> str:
        self.calls.append([tool, *args])
        self.disk["free"] += int(args[-1])
        return "2 store paths deleted, 1.00 MiB freed\n"


async def test_a_step_ending_below_the_budget_collects_and_beats_at_once(
    start_agent: Callable[..., Agent],
) -> None:
    disk = {"free": 10}
    store = FakeGcStore(disk)
    released: list[bool] = []

    async def release_idle() -> None:
        released.append(True)

    collector = StoreCollector(
        cast(NixStore, store), StoreBudget(100, 300), lambda: disk["free"], release_idle
    )
    # Heartbeats every minute: the one after the collection is early.
    async with FakeRunner(heartbeat_secs=60.0) as runner:
        agent = start_agent(runner, collector=collector, gc_check_secs=3600)
        side = await runner.next_session()
        assert side.register.free_store_bytes is not None
        await side.assign(4)
        await side.expect(Accepted)
        step = await agent.executor.next_step()
        step.release.set()  # the step ends: the agent looks at its disk
        for _ in range(100):
            message = await asyncio.wait_for(side.inbox.get(), WAIT)
            if isinstance(message, Heartbeat):
                break
        else:
            raise AssertionError("no heartbeat after the collection")
        assert store.calls == [["nix-store", "--gc", "--max-freed", "290"]]
        assert released == [True] and disk["free"] == 300
        assert collector.last is not None and collector.last.paths_deleted == 2


async def test_heartbeats_say_when_the_agent_drains(start_agent: Callable[..., Agent]) -> None:
    async with FakeRunner(heartbeat_secs=0.05) as runner:
        agent = start_agent(runner)
        side = await runner.next_session()
        await side.assign(4)
        await side.expect(Accepted)
        step = await agent.executor.next_step()
        await side.send(Drain(reason="test"))
        for _ in range(100):
            message = await asyncio.wait_for(side.inbox.get(), WAIT)
            if isinstance(message, Heartbeat) and message.draining:
                break
        else:
            raise AssertionError("no heartbeat said the agent drains")
        assert message.running == [4]
        step.release.set()


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_refusal_exits_3(
    start_agent: Callable[..., Agent], status: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="bigtent.agent.link")
    async with FakeRunner(status=status) as runner:
        agent = start_agent(runner, token="wrong")
        assert await agent.exit_code() == EXIT_AUTH_REFUSED == 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    text = errors[0].getMessage()
    assert "refused the agent's credentials" in text
    assert f"HTTP {status}" in text and "unknown token" in text
    assert "\n" not in text
    assert "wrong" not in text
    assert text.endswith("check the agent token and its role")


async def test_auth_refusal_of_an_oidc_credential_says_what_to_check(
    start_agent: Callable[..., Agent], caplog: pytest.LogCaptureFixture
) -> None:
    from bigtent.agent.credentials import github_actions_token

    source = github_actions_token(
        {"ACTIONS_ID_TOKEN_REQUEST_URL": "http://x/t", "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "r"},
        "bigtent",
    )
    caplog.set_level(logging.ERROR, logger="bigtent.agent.link")
    async with FakeRunner(status=403) as runner:
        agent = start_agent(runner, token=CountingSource(hint=source.refusal_hint))
        assert await agent.exit_code() == EXIT_AUTH_REFUSED
    assert "check that audience 'bigtent' is one of the runner's [[auth.oidc]]" in caplog.text


async def test_unreachable_runner_is_retried_until_shutdown(tmp_path: Path) -> None:
    attempts: list[str] = []
    retried = asyncio.Event()

    class Unreachable:
        def __init__(self, url: str) -> None:
            self.url = url

        async def __aenter__(self) -> Connection:
            attempts.append(self.url)
            if len(attempts) >= 3:
                retried.set()
            raise RunnerUnreachable("connection refused")

        async def __aexit__(self, *exc: object) -> None:
            pass

    def unreachable(url: str, headers: Mapping[str, str]) -> Unreachable:
        return Unreachable(url)

    session = AgentSession(
        AgentSection(runner_url="http://127.0.0.1:9", work_dir=tmp_path),
        AgentIdentity(MachineId("m-1"), "agent-1", "host-1", ("x86_64-linux",)),
        token=None,
        connect=unreachable,
        executor=FakeExecutor(),
        rand=lambda: 0.0,
        store_dir=tmp_path,
    )
    task = asyncio.create_task(session.run())
    try:
        await asyncio.wait_for(retried.wait(), WAIT)
        assert attempts[0] == "ws://127.0.0.1:9/api/v1/agent/ws"
        session.request_shutdown()
        assert await asyncio.wait_for(task, WAIT) == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_sigterm_drains_then_second_aborts(start_agent: Callable[..., Agent]) -> None:
    async with FakeRunner() as runner:
        agent = start_agent(runner, max_jobs=2)
        side = await runner.next_session()
        await side.assign(1)
        await side.expect(Accepted)
        step = await agent.executor.next_step()

        agent.session.request_shutdown()
        assert agent.session.draining
        await side.assign(2)
        assert (await side.expect(Refused)).reason == "the agent is draining"
        assert not step.abort.is_set()

        agent.session.request_shutdown()
        await asyncio.wait_for(step.abort.wait(), WAIT)
        result = await side.expect(Result)
        assert result.outcome is Outcome.ABORTED
        await side.send(ResultAck(step_id=StepId(1), lease_id=LeaseId("lease-1"), recorded=True))
        assert await agent.exit_code() == 0


async def test_runner_error_message_makes_the_agent_reconnect(
    start_agent: Callable[..., Agent],
) -> None:
    async with FakeRunner() as runner:
        start_agent(runner)
        first = await runner.next_session()
        await first.send(Error(message="something broke"))
        second = await runner.next_session()
        assert second.register.machine_id == "m-1"


class CountingSource:
    """A credential source that hands out a new token at every fresh request."""

    def __init__(self, hint: str = "check the test source") -> None:
        self.refusal_hint = hint
        self.fresh = 0
        self.reused = 0

    async def credential(self, *, fresh: bool) -> str | None:
        if fresh:
            self.fresh += 1
        else:
            self.reused += 1
        return f"token-{self.fresh}"


async def test_every_connect_presents_a_fresh_credential(
    start_agent: Callable[..., Agent],
) -> None:
    async with FakeRunner() as runner:
        source = CountingSource()
        agent = start_agent(runner, token=source)
        first = await runner.next_session()
        await first.ws.close()
        await asyncio.wait_for(first.closed.wait(), WAIT)
        second = await runner.next_session()
        assert runner.auth_headers == ["Bearer token-1", "Bearer token-2"]
        assert (source.fresh, source.reused) == (2, 0)
        await second.send(Drain())
        assert await agent.exit_code() == 0


class FailingSource:
    refusal_hint = "check the test source"

    def __init__(self) -> None:
        self.calls = 0

    async def credential(self, *, fresh: bool) -> str | None:
        self.calls += 1
        if self.calls == 1:
            raise CredentialUnavailable("the ID token request failed: HTTP 500")
        return "good"


async def test_a_persistent_agent_retries_when_its_credential_is_unavailable(
    start_agent: Callable[..., Agent], caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeRunner() as runner:
        agent = start_agent(runner, token=FailingSource())
        side = await runner.next_session()
        assert runner.auth_headers == ["Bearer good"]
        assert "cannot get the agent's credential: the ID token request failed" in caplog.text
        await side.send(Drain())
        assert await agent.exit_code() == 0
