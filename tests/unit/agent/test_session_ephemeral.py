"""An ephemeral agent session (architecture §4) against the fake runner: limits, one session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from bigtent.agent.connection import Connection, websocket_connector
from bigtent.agent.identity import MACHINE_ID_FILE, AgentIdentity
from bigtent.agent.limits import Limits
from bigtent.agent.link import EXIT_AUTH_REFUSED, EXIT_PROTOCOL_ERROR, EXIT_RUNNER_UNREACHABLE
from bigtent.agent.main import run_agent
from bigtent.agent.session import AgentSession
from bigtent.config import AgentConfig, AgentSection, EphemeralSection
from bigtent.errors import CredentialUnavailable, RunnerUnreachable
from bigtent.protocol import (
    Accepted,
    Assign,
    Drain,
    Error,
    LeaseId,
    MachineId,
    Outcome,
    Refused,
    Result,
    ResultAck,
    StepId,
    parse_agent_message,
)
from tests.unit.agent.test_session import WAIT, Agent, FakeExecutor, FakeRunner, RunnerSide


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def start_ephemeral(tmp_path: Path) -> AsyncIterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def start(
        runner: FakeRunner,
        limits: Limits,
        *,
        clock: Callable[[], float] | None = None,
        token: Any = "secret",
        launch_id: str | None = None,
        **section: Any,
    ) -> Agent:
        cfg = AgentSection(runner_url=runner.url, work_dir=tmp_path, **section)
        identity = AgentIdentity(
            MachineId("m-e"),
            "eph-1",
            "host-1",
            ("x86_64-linux",),
            ephemeral=True,
            launch_id=launch_id,
        )
        executor = FakeExecutor()
        extra: dict[str, Any] = {} if clock is None else {"clock": clock}
        session = AgentSession(
            cfg,
            identity,
            token=token,
            connect=websocket_connector(),
            executor=executor,
            rand=lambda: 0.0,
            store_dir=tmp_path,
            limits=limits,
            **extra,
        )
        agent = Agent(session, executor, asyncio.create_task(session.run()))
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        if not agent.task.done():
            agent.task.cancel()
        await asyncio.gather(agent.task, return_exceptions=True)


async def _ack(side: RunnerSide, step_id: int) -> None:
    await side.send(
        ResultAck(step_id=StepId(step_id), lease_id=LeaseId(f"lease-{step_id}"), recorded=True)
    )


async def test_exits_0_after_max_builds_with_work_still_offered(
    start_ephemeral: Callable[..., Agent],
) -> None:
    async with FakeRunner() as runner:
        agent = start_ephemeral(runner, Limits(max_builds=2), max_jobs=4)
        side = await runner.next_session()
        assert side.register.ephemeral is True
        await side.assign(1)
        await side.assign(2)
        assert (await side.expect(Accepted)).step_id == 1
        assert (await side.expect(Accepted)).step_id == 2
        assert agent.session.draining  # the last build of the budget starts the drain
        # More work is offered; a free slot does not matter.
        await side.assign(3)
        refused = await side.expect(Refused)
        assert refused.step_id == 3
        assert refused.reason == "the agent is draining: reached max_builds (2)"
        steps = [await agent.executor.next_step(), await agent.executor.next_step()]
        assert not any(s.abort.is_set() for s in steps)  # draining finishes what runs
        for step in steps:
            step.release.set()
        for _ in steps:
            result = await side.expect(Result)
            assert result.outcome is Outcome.SUCCESS
            assert not agent.task.done()
            await _ack(side, result.step_id)
        assert await agent.exit_code() == 0
        await asyncio.wait_for(side.closed.wait(), WAIT)
        assert runner.sessions.empty()
        assert agent.session.builds_taken == 2


async def test_concurrent_assigns_never_pass_max_builds(
    start_ephemeral: Callable[..., Agent],
) -> None:
    """Many assigns racing each other (each acceptance's send yields to the others): exactly
    ``max_builds`` are accepted."""
    async with FakeRunner() as runner:
        agent = start_ephemeral(runner, Limits(max_builds=3), max_jobs=100)
        side = await runner.next_session()
        await asyncio.wait_for(agent.session.registered.wait(), WAIT)

        class SlowConnection:
            def __init__(self) -> None:
                self.sent: list[str] = []

            async def send(self, message: str) -> None:
                await asyncio.sleep(0)
                self.sent.append(message)
                await asyncio.sleep(0)

            async def recv(self) -> str:
                raise AssertionError("not used")

        conn = SlowConnection()
        assigns = [
            Assign(
                step_id=StepId(i),
                lease_id=LeaseId(f"lease-{i}"),
                drv_path=f"/nix/store/{'a' * 32}-s{i}.drv",
                outputs={"out": f"/nix/store/{'b' * 32}-s{i}"},
                upload_urls={"out": f"/api/v1/agent/upload/lease-{i}/out"},
                timeout_secs=60,
                max_silent_secs=60,
                max_log_bytes=1 << 20,
            )
            for i in range(1, 51)
        ]
        await asyncio.gather(*(agent.session._on_assign(conn, a) for a in assigns))
        replies = [parse_agent_message(m) for m in conn.sent]
        accepted = [r for r in replies if isinstance(r, Accepted)]
        refused = [r for r in replies if isinstance(r, Refused)]
        assert len(accepted) == 3 and len(refused) == 47
        assert {r.reason for r in refused} == {"the agent is draining: reached max_builds (3)"}
        assert len(agent.session.running) == 3
        assert agent.session.builds_taken == 3
        # The runner's own assign is refused too, over the wire.
        await side.assign(99)
        assert (await side.expect(Refused)).step_id == 99


async def test_back_to_back_assigns_over_the_wire(start_ephemeral: Callable[..., Agent]) -> None:
    async with FakeRunner() as runner:
        agent = start_ephemeral(runner, Limits(max_builds=3), max_jobs=30)
        side = await runner.next_session()
        for i in range(1, 31):
            await side.assign(i)
        replies = [await side.expect(Accepted | Refused) for _ in range(30)]  # type: ignore[arg-type]
        assert [r.step_id for r in replies if isinstance(r, Accepted)] == [1, 2, 3]
        assert agent.session.running == [1, 2, 3]


async def test_idle_counts_from_last_assign_or_completion(
    start_ephemeral: Callable[..., Agent],
) -> None:
    clock = FakeClock()
    async with FakeRunner() as runner:
        agent = start_ephemeral(runner, Limits(max_idle_secs=120), clock=clock)
        side = await runner.next_session()
        clock.now += 100
        assert not agent.session.check_limits()
        await side.assign(1)
        await side.expect(Accepted)
        step = await agent.executor.next_step()
        clock.now += 1000  # a running step: not idle however long it takes
        assert not agent.session.check_limits()
        step.release.set()
        await side.expect(Result)
        await _ack(side, 1)
        clock.now += 119  # idle since the completion
        assert not agent.session.check_limits()
        clock.now += 1
        assert agent.session.check_limits()
        assert await agent.exit_code() == 0


async def test_lifetime_drains_and_finishes_running_steps(
    start_ephemeral: Callable[..., Agent],
) -> None:
    clock = FakeClock()
    async with FakeRunner() as runner:
        agent = start_ephemeral(
            runner, Limits(max_idle_secs=1e6, max_lifetime_secs=60), clock=clock, max_jobs=2
        )
        side = await runner.next_session()
        await side.assign(1)
        await side.expect(Accepted)
        step = await agent.executor.next_step()
        clock.now += 60
        assert agent.session.check_limits()
        await side.assign(2)
        refused = await side.expect(Refused)
        assert refused.reason == "the agent is draining: reached max_lifetime_secs (60 s)"
        assert not step.abort.is_set()
        step.release.set()
        assert (await side.expect(Result)).outcome is Outcome.SUCCESS
        await _ack(side, 1)
        assert await agent.exit_code() == 0


async def test_lifetime_passing_between_looks_refuses_the_assign(
    start_ephemeral: Callable[..., Agent],
) -> None:
    clock = FakeClock()
    async with FakeRunner() as runner:
        agent = start_ephemeral(runner, Limits(max_lifetime_secs=5), clock=clock)
        side = await runner.next_session()
        clock.now += 5  # no one looked: the assign itself notices
        await side.assign(1)
        assert "max_lifetime_secs" in (await side.expect(Refused)).reason
        assert await agent.exit_code() == 0


async def test_idle_deadline_fires_on_its_own(start_ephemeral: Callable[..., Agent]) -> None:
    """The watcher wakes at the deadline by itself (real clock, a short idle limit)."""
    async with FakeRunner() as runner:
        agent = start_ephemeral(runner, Limits(max_idle_secs=0.2))
        side = await runner.next_session()
        assert await agent.exit_code() == 0
        await asyncio.wait_for(side.closed.wait(), WAIT)


async def test_runner_drain_exits_0(start_ephemeral: Callable[..., Agent]) -> None:
    async with FakeRunner() as runner:
        agent = start_ephemeral(runner, Limits())
        side = await runner.next_session()
        await side.send(Drain(reason="scale down"))
        assert await agent.exit_code() == 0


async def test_dropped_session_is_a_failure_and_never_reconnects(
    start_ephemeral: Callable[..., Agent],
) -> None:
    async with FakeRunner() as runner:
        agent = start_ephemeral(runner, Limits(max_builds=5))
        side = await runner.next_session()
        await side.assign(1)
        await side.expect(Accepted)
        step = await agent.executor.next_step()
        await side.ws.close()
        assert await agent.exit_code() == EXIT_RUNNER_UNREACHABLE == 4
        assert step.abort.is_set()  # its steps are abandoned (the runner re-queues them)
        assert runner.sessions.empty()
        assert len(runner.auth_headers) == 1


async def test_runner_error_is_a_protocol_failure(start_ephemeral: Callable[..., Agent]) -> None:
    async with FakeRunner() as runner:
        agent = start_ephemeral(runner, Limits())
        side = await runner.next_session()
        await side.send(Error(message="something broke"))
        assert await agent.exit_code() == EXIT_PROTOCOL_ERROR == 1
        assert len(runner.auth_headers) == 1


async def test_auth_refusal_exits_3(start_ephemeral: Callable[..., Agent]) -> None:
    async with FakeRunner(status=401) as runner:
        agent = start_ephemeral(runner, Limits())
        assert await agent.exit_code() == EXIT_AUTH_REFUSED == 3
        assert len(runner.auth_headers) == 1


async def test_unreachable_runner_fails_at_once(tmp_path: Path) -> None:
    attempts: list[str] = []

    class Unreachable:
        async def __aenter__(self) -> Connection:
            attempts.append("x")
            raise RunnerUnreachable("connection refused")

        async def __aexit__(self, *exc: object) -> None:
            pass

    def unreachable(url: str, headers: Mapping[str, str]) -> Unreachable:
        return Unreachable()

    session = AgentSession(
        AgentSection(runner_url="http://127.0.0.1:9", work_dir=tmp_path),
        AgentIdentity(MachineId("m-1"), "eph", "host-1", ("x86_64-linux",), ephemeral=True),
        token=None,
        connect=unreachable,
        executor=FakeExecutor(),
        store_dir=tmp_path,
        limits=Limits(),
    )
    assert await asyncio.wait_for(session.run(), WAIT) == EXIT_RUNNER_UNREACHABLE
    assert attempts == ["x"]


async def test_run_agent_ephemeral_identity_is_fresh_and_not_on_disk(tmp_path: Path) -> None:
    """``[agent.ephemeral]`` alone (no identity seam) makes an ephemeral agent."""
    names = []
    ids = []
    async with FakeRunner() as runner:
        for _ in range(2):
            cfg = AgentConfig(
                agent=AgentSection(
                    runner_url=runner.url,
                    work_dir=tmp_path,
                    probe=False,
                    name="gha",
                    systems=["x86_64-linux"],
                    ephemeral=EphemeralSection(max_builds=1),
                )
            )
            task = asyncio.create_task(run_agent(cfg, "tok", install_signal_handlers=False))
            try:
                side = await runner.next_session()
                reg = side.register
                assert reg.ephemeral is True
                assert reg.name == f"gha-{reg.machine_id[:8]}"
                names.append(reg.name)
                ids.append(reg.machine_id)
                await side.send(Drain())
                assert await asyncio.wait_for(task, WAIT) == 0
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    assert ids[0] != ids[1] and names[0] != names[1]
    assert not (tmp_path / MACHINE_ID_FILE).exists()
    assert not any(p.name.startswith((MACHINE_ID_FILE, ".machine-id")) for p in tmp_path.rglob("*"))


async def test_register_reports_the_launch_id(start_ephemeral: Callable[..., Agent]) -> None:
    async with FakeRunner() as runner:
        agent = start_ephemeral(runner, Limits(max_builds=1), launch_id="gha-pool-17")
        side = await runner.next_session()
        assert side.register.launch_id == "gha-pool-17"
        await side.send(Drain())
        assert await agent.exit_code() == 0


class _Unavailable:
    refusal_hint = "check the test source"

    async def credential(self, *, fresh: bool) -> str | None:
        raise CredentialUnavailable("requesting the GitHub Actions ID token failed: HTTP 403")


async def test_an_unavailable_credential_ends_the_agent_with_exit_3(
    start_ephemeral: Callable[..., Agent], caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeRunner() as runner:
        agent = start_ephemeral(runner, Limits(max_builds=1), token=_Unavailable())
        assert await agent.exit_code() == EXIT_AUTH_REFUSED
        assert runner.auth_headers == []  # it never dialled without a credential
        assert "cannot get the agent's credential: requesting the GitHub" in caplog.text
