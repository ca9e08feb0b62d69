"""The serve executor against real Nix: long-lived ``nix-store --serve --write`` processes per
slot build steps whose .drv the agent read over HTTP and whose inputs Nix substituted from a
signed binary cache; processes are reused across steps and replaced after an abort."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import httpx
import pytest

from bigtent.agent.executor import Executor
from bigtent.agent.stepstore import CacheSettings
from bigtent.config import AgentSection
from bigtent.nix.drv import parse_drv
from bigtent.nix.store import NixStore
from bigtent.protocol import Assign, Log, Outcome, Result
from bigtent.storebudget import StepRoots, StoreBudget, StoreCollector, gc_roots_dir
from tests.integration.agent.test_executor_nix import (
    NIX,
    SANDBOX_PATHS,
    FakeRunnerHttp,
    Nix,
    assign_for,
    cache_key,
    fake_runner,
    nix,
)

pytestmark = [pytest.mark.nix]
__all__ = ["cache_key", "fake_runner", "nix"]

HOST_TOOLS = ["--option", "extra-sandbox-paths", " ".join(SANDBOX_PATHS)]


def mk(name: str, script: str, deps: dict[str, str] | None = None) -> str:
    attrs = "".join(f" {k} = {v};" for k, v in (deps or {}).items())
    return (
        f'derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh"; '
        f'PATH = "/usr/bin:/bin"; args = ["-c" {json.dumps(script)}];{attrs} }}'
    )


def instantiate(nix: Nix, expr: str) -> tuple[str, str]:
    drv = nix.run(
        "nix-instantiate", "--store", nix.client_store, "--option", "substituters", "",
        "--expr", expr,
    )  # fmt: skip
    return drv, nix.run("nix-store", "--store", nix.client_store, "-q", "--outputs", drv)


def publish_outputs(nix: Nix, drv: str, cache_dir: Path, secret_key: Path) -> None:
    """Build ``drv`` in the client store and copy its outputs into the cache."""
    out = nix.run(
        "nix-store", "--store", nix.client_store, "--option", "substituters", "", *HOST_TOOLS,
        "-r", drv,
    )  # fmt: skip
    nix.run(
        "nix", *NIX, "copy", "--option", "substituters", "", "--from", nix.client_store,
        "--to", f"file://{cache_dir}?secret-key={secret_key}&compression=none", out,
    )  # fmt: skip


class Agent:
    """One serve executor used for several steps, as an agent slot uses it."""

    def __init__(self, tmp: Path, runner: FakeRunnerHttp, public_key: str, http: httpx.AsyncClient):
        self.root = tmp / "agent-store"
        section = AgentSection(
            runner_url=runner.url,
            store=f"local?root={self.root}",
            work_dir=tmp / "agent-work",
            sandbox_paths=SANDBOX_PATHS,
            executor="serve",
        )
        self.section = section
        self.executor = Executor(section, http=http, token="agent-token")
        self.cache = CacheSettings(runner.url + "/cache", public_key)

    async def run(self, assign: Assign, abort_on: str | None = None) -> tuple[Result, list[str]]:
        lines: list[str] = []
        abort = asyncio.Event()

        async def send_log(message: Log) -> bool:
            lines.extend(message.lines)
            if abort_on is not None and abort_on in message.lines:
                abort.set()
            return True

        result = await asyncio.wait_for(
            self.executor.run(assign, self.cache, send_log=send_log, abort=abort), 120
        )
        return result, lines

    def pids(self) -> list[int]:
        return sorted(c.proc.pid for c in self.executor.serve_processes)

    def valid(self, path: str) -> bool:
        store = f"local?root={self.root}"
        return (
            subprocess.run(
                ["nix-store", "--store", store, "--check-validity", path], capture_output=True
            ).returncode
            == 0
        )


async def test_steps_with_inputs_reuse_the_serve_processes(
    tmp_path: Path, nix: Nix, fake_runner: FakeRunnerHttp, cache_key: tuple[Path, str]
) -> None:
    secret, public = cache_key
    src = 'builtins.toFile "greeting" "hello from a source"'
    steps = []
    for i in range(2):
        dep = mk(f"bt-dep-{i}", f"echo dep {i} > $out")
        dep_drv, dep_out = instantiate(nix, dep)
        publish_outputs(nix, dep_drv, fake_runner.cache_dir, secret)
        top = mk(
            f"bt-top-{i}",
            f"echo building-top-{i}; cat $dep $src > $out",
            {"dep": dep, "src": src},
        )
        drv, out = instantiate(nix, top)
        nix.publish(drv, fake_runner.cache_dir, secret)
        steps.append((drv, out, dep_drv, dep_out))

    async with httpx.AsyncClient(timeout=30) as http:
        agent = Agent(tmp_path, fake_runner, public, http)
        try:
            pids: list[int] = []
            for n, (drv, out, dep_drv, dep_out) in enumerate(steps, start=1):
                result, lines = await agent.run(assign_for(drv, out, step=n))
                assert result.outcome is Outcome.SUCCESS, result.error
                assert f"building-top-{n - 1}" in lines
                assert any(dep_out in line and "copying path" in line for line in lines), lines
                content = (agent.root / out.lstrip("/")).read_text()
                assert content == f"dep {n - 1}\nhello from a source"
                # Neither the step's .drv nor its input's entered the agent's store.
                assert not agent.valid(drv) and not agent.valid(dep_drv)
                assert len(agent.pids()) == 2  # a substituter and a builder
                if pids:
                    assert agent.pids() == pids, "serve processes must be reused"
                pids = agent.pids()
            assert agent.executor.drvs.fetches == 4
            assert (tmp_path / "agent-work" / "xdg-cache" / "slot-0").is_dir()
        finally:
            await agent.executor.aclose()
        assert agent.executor.serve_processes == []


async def test_abort_kills_the_process_and_the_next_step_still_works(
    tmp_path: Path, nix: Nix, fake_runner: FakeRunnerHttp, cache_key: tuple[Path, str]
) -> None:
    secret, public = cache_key
    slow, slow_out = nix.instantiate("bt-serve-slow", "echo started; sleep 60; echo hi > $out")
    quick, quick_out = nix.instantiate("bt-serve-quick", "echo quick; echo hi > $out")
    for drv in (slow, quick):
        nix.publish(drv, fake_runner.cache_dir, secret)

    async with httpx.AsyncClient(timeout=30) as http:
        agent = Agent(tmp_path, fake_runner, public, http)
        try:
            result, _ = await agent.run(assign_for(slow, slow_out, step=1), abort_on="started")
            assert result.outcome is Outcome.ABORTED
            assert result.timings.build_secs < 30
            assert agent.executor.serve_processes == []  # killed, not reused
            assert not (agent.root / slow_out.lstrip("/")).exists()

            result, lines = await agent.run(assign_for(quick, quick_out, step=2))
            assert result.outcome is Outcome.SUCCESS, result.error
            assert "quick" in lines
            assert len(agent.pids()) == 1  # a builder; nothing to substitute
        finally:
            await agent.executor.aclose()


async def test_failure_then_success_on_the_same_process(
    tmp_path: Path, nix: Nix, fake_runner: FakeRunnerHttp, cache_key: tuple[Path, str]
) -> None:
    secret, public = cache_key
    bad, bad_out = nix.instantiate("bt-serve-bad", "echo about-to-fail; exit 3")
    good, good_out = nix.instantiate("bt-serve-good", "echo fine; echo hi > $out")
    for drv in (bad, good):
        nix.publish(drv, fake_runner.cache_dir, secret)

    async with httpx.AsyncClient(timeout=30) as http:
        agent = Agent(tmp_path, fake_runner, public, http)
        try:
            result, lines = await agent.run(assign_for(bad, bad_out, step=1))
            assert result.outcome is Outcome.BUILD_FAILURE
            assert result.exit_code == 100
            assert result.error.startswith("error: builder for")
            assert "exit code 3" in result.error and "\x1b" not in result.error
            assert "about-to-fail" in lines
            pids = agent.pids()

            result, lines = await agent.run(assign_for(good, good_out, step=2))
            assert result.outcome is Outcome.SUCCESS, result.error
            assert lines == ["fine"], "a step's log is its own"
            assert agent.pids() == pids
        finally:
            await agent.executor.aclose()


async def test_log_limit(
    tmp_path: Path, nix: Nix, fake_runner: FakeRunnerHttp, cache_key: tuple[Path, str]
) -> None:
    secret, public = cache_key
    chatty, out = nix.instantiate(
        "bt-serve-chatty", "i=0; while [ $i -lt 5000 ]; do echo line $i; i=$((i+1)); done; sleep 60"
    )
    nix.publish(chatty, fake_runner.cache_dir, secret)
    assign = assign_for(chatty, out).model_copy(update={"max_log_bytes": 4096})

    async with httpx.AsyncClient(timeout=30) as http:
        agent = Agent(tmp_path, fake_runner, public, http)
        try:
            result, lines = await agent.run(assign)
        finally:
            await agent.executor.aclose()
    assert result.outcome is Outcome.LOG_LIMIT
    assert result.timings.build_secs < 30
    assert 0 < len(lines) < 1000


async def test_a_collection_while_a_step_builds_keeps_its_inputs_then_frees_them(
    tmp_path: Path, nix: Nix, fake_runner: FakeRunnerHttp, cache_key: tuple[Path, str]
) -> None:
    secret, public = cache_key
    dep = mk("bt-gc-dep", "echo the input > $out")
    dep_drv, dep_out = instantiate(nix, dep)
    publish_outputs(nix, dep_drv, fake_runner.cache_dir, secret)
    top = mk("bt-gc-top", "echo started; sleep 3; cat $dep > $out", {"dep": dep})
    drv, out = instantiate(nix, top)
    nix.publish(drv, fake_runner.cache_dir, secret)

    async with httpx.AsyncClient(timeout=30) as http:
        agent = Agent(tmp_path, fake_runner, public, http)
        section = agent.section
        roots = StepRoots(gc_roots_dir(section.store, section.work_dir))
        roots.reset()
        agent.executor.roots = roots
        store = NixStore(store=section.store)
        collector = StoreCollector(
            store, StoreBudget(1 << 60), lambda: 0, agent.executor.release_idle
        )
        started = asyncio.Event()

        async def send_log(message: Log) -> bool:
            if "started" in message.lines:
                started.set()
            return True

        try:
            step = asyncio.ensure_future(
                agent.executor.run(
                    assign_for(drv, out, step=1), agent.cache, send_log=send_log,
                    abort=asyncio.Event(),
                )
            )  # fmt: skip
            await asyncio.wait_for(started.wait(), 60)
            # The step builds: its input is rooted (and held by its serve processes).
            assert roots.held() == {drv, out, dep_out}
            await collector.maybe_collect()
            assert agent.valid(dep_out)
            result = await asyncio.wait_for(step, 60)
            assert result.outcome is Outcome.SUCCESS, result.error
            assert (agent.root / out.lstrip("/")).read_text() == "the input\n"
            # The step is over: no roots, and its slot's serve processes were stopped (they
            # were busy at the collection), so the next collection frees input and output.
            assert roots.held() == set() and agent.executor.serve_processes == []
            await collector.maybe_collect()
            assert not agent.valid(dep_out) and not agent.valid(out)
        finally:
            await agent.executor.aclose()


async def test_a_step_builds_from_the_assignment_alone(
    tmp_path: Path, nix: Nix, fake_runner: FakeRunnerHttp, cache_key: tuple[Path, str]
) -> None:
    """The assignment carries the .drv's text and the input paths: the agent builds without
    fetching a .drv (the cache does not even hold the step's), substituting only the inputs."""
    secret, public = cache_key
    src = 'builtins.toFile "note" "carried"'
    dep = mk("bt-carried-dep", "echo dep > $out")
    dep_drv, dep_out = instantiate(nix, dep)
    publish_outputs(nix, dep_drv, fake_runner.cache_dir, secret)
    drv, out = instantiate(
        nix,
        mk("bt-carried", "echo building-carried; cat $dep $src > $out", {"dep": dep, "src": src}),
    )
    text = (nix.tmp / "client" / drv.lstrip("/")).read_text()
    [src_path] = parse_drv(text).input_srcs
    nix.run(
        "nix", *NIX, "copy", "--option", "substituters", "", "--from", nix.client_store,
        "--to", f"file://{fake_runner.cache_dir}?secret-key={secret}&compression=none", src_path,
    )  # fmt: skip
    assert not list(fake_runner.cache_dir.glob(f"{drv[len('/nix/store/') :][:32]}.narinfo"))
    assign = Assign.model_validate(
        {**assign_for(drv, out).model_dump(), "drv_text": text, "inputs": [dep_out, src_path]}
    )
    async with httpx.AsyncClient(timeout=30) as http:
        agent = Agent(tmp_path, fake_runner, public, http)
        try:
            result, lines = await agent.run(assign)
            assert result.outcome is Outcome.SUCCESS, result.error
            assert "building-carried" in lines
            assert (agent.root / out.lstrip("/")).read_text() == "dep\ncarried"
            assert agent.executor.drvs.fetches == 0
            assert not agent.valid(drv) and not agent.valid(dep_drv)
        finally:
            await agent.executor.aclose()
