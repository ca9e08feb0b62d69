"""``run_agent`` (``agent/main.py``): the agent process wired together, against the fake
runner of the session tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bigtent.agent.identity import AgentIdentity
from bigtent.agent.main import run_agent
from bigtent.config import AgentConfig, AgentSection
from bigtent.protocol import Drain, MachineId
from tests.unit.agent.test_session import WAIT, FakeRunner

IDENTITY = AgentIdentity(MachineId("m-9"), "agent-9", "host-9", ("x86_64-linux",))


async def test_run_agent_auth_refusal_returns_3(tmp_path: Path) -> None:
    async with FakeRunner(status=401) as runner:
        cfg = AgentConfig(agent=AgentSection(runner_url=runner.url, work_dir=tmp_path, probe=False))
        code = await asyncio.wait_for(
            run_agent(cfg, "bad", identity=IDENTITY, install_signal_handlers=False), WAIT
        )
    assert code == 3
    assert runner.auth_headers == ["Bearer bad"]


async def test_run_agent_without_token_drains_to_0(tmp_path: Path) -> None:
    async with FakeRunner() as runner:
        cfg = AgentConfig(agent=AgentSection(runner_url=runner.url, work_dir=tmp_path, probe=False))
        task = asyncio.create_task(
            run_agent(cfg, None, identity=IDENTITY, install_signal_handlers=False)
        )
        try:
            side = await runner.next_session()
            assert side.register.machine_id == "m-9"
            await side.send(Drain())
            assert await asyncio.wait_for(task, WAIT) == 0
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert runner.auth_headers == [None]
