"""The SSH builder venue without an sshd: a fake store records how a step would be realised
(builders line, NIX_SSHOPTS, the pinned known_hosts file) and builds with the host's Nix, so
outputs go through the real verified ingest; the scheduling order and backoff are checked on
the real scheduler."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from bigtent import protocol as p
from bigtent.config import Role, SchedulerSection
from bigtent.nix.store import LineSink, NixStore, PathInfo, RealiseResult, RealiseStatus
from bigtent.runner.db import queries
from bigtent.runner.db.migrate import create_engine
from bigtent.runner.logs.store import LogStore
from bigtent.runner.scheduler.model import AGENT, SSH, PlannedStep, Venue
from bigtent.runner.scheduler.service import Scheduler
from bigtent.runner.venues.sshvenue import BuildStore
from bigtent.states import StepState
from tests.conftest import HOST_TOOLS, current_system
from tests.integration.runner.conftest import (
    Drvs,
    MakeRunner,
    Nix,
    RunnerHarness,
    eventually,
    upload_closure,
)

PORT = 2222


def _host_key(tmp: Path) -> str:
    key = tmp / "hostkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return " ".join((tmp / "hostkey.pub").read_text().split()[:2])


@dataclass
class Call:
    store: str
    options: dict[str, str]
    env: dict[str, str]
    known_hosts: str = ""
    known_hosts_mode: int = 0
    known_hosts_dir_mode: int = 0


@dataclass
class FakeStores:
    """A StoreFactory: records each realise; builds with the host's store (or fails)."""

    status: RealiseStatus = RealiseStatus.SUCCESS
    exit_code: int = 0
    calls: list[Call] = field(default_factory=list)
    on_realise: Callable[[], None] | None = None
    """Called while each realise runs."""

    def __call__(
        self, store: str, options: Mapping[str, str], env: Mapping[str, str]
    ) -> BuildStore:
        return _FakeStore(self, Call(store, dict(options), dict(env)))


class _FakeStore:
    def __init__(self, stores: FakeStores, call: Call) -> None:
        self.stores = stores
        self.call = call
        self.host = NixStore(
            options={"substituters": "", "extra-sandbox-paths": " ".join(HOST_TOOLS)}
        )

    async def realise(
        self,
        paths: list[str],
        *,
        on_line: LineSink | None = None,
        timeout_secs: float | None = None,
        max_silent_secs: float | None = None,
        max_log_bytes: int | None = None,
        abort: asyncio.Event | None = None,
    ) -> RealiseResult:
        opts = self.call.env["NIX_SSHOPTS"].split()
        kh = next(o.split("=", 1)[1] for o in opts if o.startswith("UserKnownHostsFile="))
        # The file exists (only) while Nix runs.
        self.call.known_hosts = Path(kh).read_text()
        self.call.known_hosts_mode = stat.S_IMODE(os.stat(kh).st_mode)
        self.call.known_hosts_dir_mode = stat.S_IMODE(os.stat(Path(kh).parent).st_mode)
        self.stores.calls.append(self.call)
        if self.stores.on_realise is not None:
            self.stores.on_realise()
        if on_line is not None:
            on_line("building on the fake builder")
        if self.stores.status is not RealiseStatus.SUCCESS:
            return RealiseResult(self.stores.status, self.stores.exit_code, error="error: nope")
        return await self.host.realise(paths)

    async def path_info(
        self, paths: list[str], *, recursive: bool = False, derivation: bool = True
    ) -> list[PathInfo]:
        return await self.host.path_info(paths, recursive=recursive, derivation=derivation)

    def real_path(self, store_path: str) -> Path:
        return Path(store_path)


def _builder(host_key: str | None, **extra: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "uri": f"ssh://nix@127.0.0.1:{PORT}",
        "systems": [current_system()],
        "max_jobs": 2,
        "ssh_key": "/etc/bigtent/id_ed25519",
        "supported_features": ["big-parallel"],
        **extra,
    }
    if host_key is not None:
        b["host_key"] = host_key
    return b


async def _runner_with_builder(
    make_runner: MakeRunner, builder: dict[str, Any], **sections: Any
) -> tuple[RunnerHarness, FakeStores]:
    runner = await make_runner(ssh_builders=[builder], **sections)
    fake = FakeStores()
    runner.comps.ssh.make_store = fake
    return runner, fake


async def _build(runner: RunnerHarness, nix: Nix, drvs: Drvs) -> int:
    await upload_closure(runner, nix, drvs.closure)
    resp = await runner.client(Role.CLIENT).post("/api/v1/builds", json={"drvs": [drvs.top]})
    assert resp.status_code == 201, resp.text
    return int(resp.json()["id"])


async def _tick(runner: RunnerHarness) -> None:
    await runner.comps.scheduler.tick(runner.comps.scheduler.clock())


async def _idle(runner: RunnerHarness) -> None:
    async def no_jobs() -> bool:
        return not any(b.jobs for b in runner.comps.ssh.builders.values())

    await eventually(no_jobs)


@pytest.mark.nix
async def test_a_step_is_realised_through_the_pinned_builder_and_published(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, tmp_path: Path
) -> None:
    host_key = _host_key(tmp_path)
    runner, fake = await _runner_with_builder(make_runner, _builder(host_key))
    build_id = await _build(runner, nix, drvs)
    sched = runner.comps.scheduler
    for _ in range(3):  # dep, then top
        await _tick(runner)
        await _idle(runner)
    call = fake.calls[0]
    state = runner.state_dir
    assert call.store == f"local?root={state / 'ssh-store'}"
    assert call.options["max-jobs"] == "0"
    assert call.options["substituters"] == runner.comps.cache.url
    assert call.options["trusted-public-keys"] == runner.comps.cache.public_key
    assert call.options["builders"] == (
        f"ssh://nix@127.0.0.1 {current_system()} /etc/bigtent/id_ed25519 2 1 big-parallel - -"
    )
    opts = call.env["NIX_SSHOPTS"]
    for o in [
        "StrictHostKeyChecking=yes",
        "IdentitiesOnly=yes",
        "IdentityAgent=none",
        "BatchMode=yes",
        "GlobalKnownHostsFile=/dev/null",
    ]:
        assert f"-o {o}" in opts
    assert "-i /etc/bigtent/id_ed25519" in opts and f"-p {PORT}" in opts
    assert call.known_hosts == f"[127.0.0.1]:{PORT} {host_key}\n"
    assert call.known_hosts_mode == 0o600 and call.known_hosts_dir_mode == 0o700
    kh = next(o.split("=", 1)[1] for o in opts.split() if o.startswith("UserKnownHostsFile="))
    assert not Path(kh).exists(), "the temporary known_hosts file is removed after the step"
    assert call.env["XDG_CACHE_HOME"].startswith(str(state / "ssh-xdg"))
    # Both steps built on the builder; their outputs are signed in the cache.
    assert len(fake.calls) == 2
    outputs = nix.outputs(drvs.top)["out"], nix.outputs(drvs.dep)["out"]
    assert await runner.present(list(outputs)) == set(outputs)
    async with runner.comps.engine.connect() as conn:
        build = await queries.fetch_build(conn, build_id)
        steps = await queries.fetch_build_steps(conn, build_id)
    assert build is not None and build.state == "succeeded"
    assert {s.agent_machine_id for s in steps} == {f"ssh:ssh://nix@127.0.0.1:{PORT}"}
    assert b"building on the fake builder" in runner.comps.logs.read(steps[0].id)
    # The API lists the builder with its load.
    resp = await runner.client(Role.CLIENT).get("/api/v1/builders")
    [listed] = resp.json()["builders"]
    assert listed["usable"] and listed["running"] == 0 and listed["max_jobs"] == 2
    assert list(listed) == [
        "machine_id",
        "uri",
        "kind",
        "usable",
        "reason",
        "systems",
        "supported_features",
        "mandatory_features",
        "max_jobs",
        "running",
        "speed_factor",
        "consecutive_failures",
        "backoff_until",
        "in_backoff",
    ]
    assert listed["backoff_until"] is None
    assert sched.venues[listed["machine_id"]].kind == SSH


@pytest.mark.nix
async def test_the_ssh_store_roots_running_steps_and_is_collected_below_its_budget(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, tmp_path: Path
) -> None:
    runner, fake = await _runner_with_builder(
        make_runner, _builder(_host_key(tmp_path)), ssh_store_min_free_bytes=1 << 60
    )
    ssh = runner.comps.ssh
    assert ssh.roots is not None and ssh.collector is not None
    assert ssh.roots.directory.parent == runner.state_dir / "ssh-store/nix/var/nix/gcroots"
    held: list[set[str]] = []
    fake.on_realise = lambda: held.append(ssh.roots.held() if ssh.roots else set())
    build_id = await _build(runner, nix, drvs)
    for _ in range(3):  # dep, then top
        await _tick(runner)
        await _idle(runner)
    # While each step ran, its .drv and outputs were GC roots of the SSH store; after it,
    # none are left, and the store was collected (its free disk is below the budget).
    dep_out, top_out = nix.outputs(drvs.dep)["out"], nix.outputs(drvs.top)["out"]
    assert held == [{drvs.dep, dep_out}, {drvs.top, top_out}]
    assert ssh.roots.held() == set() and list(ssh.roots.directory.iterdir()) == []
    assert ssh.collector.collections == 2
    assert await runner.present([dep_out, top_out]) == {dep_out, top_out}
    async with runner.comps.engine.connect() as conn:
        build = await queries.fetch_build(conn, build_id)
    assert build is not None and build.state == "succeeded"


@pytest.mark.nix
async def test_an_infrastructure_failure_backs_the_builder_off(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, tmp_path: Path
) -> None:
    runner, fake = await _runner_with_builder(make_runner, _builder(_host_key(tmp_path)))
    fake.status, fake.exit_code = RealiseStatus.OTHER_FAILURE, 1
    await _build(runner, nix, drvs)
    await _tick(runner)
    await _idle(runner)
    [builder] = runner.comps.ssh.builders.values()
    sched = runner.comps.scheduler
    now = sched.clock()
    assert builder.venue.consecutive_failures == 1
    assert builder.venue.backoff_until > now
    dep = sched.nodes[sched.by_drv[drvs.dep]]
    assert dep.state is StepState.RUNNABLE and dep.attempts == 1
    # In backoff: the next pass sends it nothing.
    await _tick(runner)
    assert len(fake.calls) == 1 and not builder.jobs
    resp = await runner.client(Role.CLIENT).get("/api/v1/builders")
    [listed] = resp.json()["builders"]
    assert listed["in_backoff"] and listed["consecutive_failures"] == 1


@pytest.mark.nix
async def test_a_build_failure_fails_the_step_without_backoff(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs, tmp_path: Path
) -> None:
    runner, fake = await _runner_with_builder(make_runner, _builder(_host_key(tmp_path)))
    fake.status, fake.exit_code = RealiseStatus.BUILD_FAILURE, 100
    await _build(runner, nix, drvs)
    await _tick(runner)
    await _idle(runner)
    [builder] = runner.comps.ssh.builders.values()
    sched = runner.comps.scheduler
    assert builder.venue.backoff_until == 0.0
    async with runner.comps.engine.connect() as conn:
        row = (await queries.fetch_steps_by_drv(conn, [drvs.dep]))[drvs.dep]
    assert row.state == StepState.FAILED and row.outcome == "build_failure"
    assert sched.by_drv.get(drvs.dep) is None or sched.nodes[sched.by_drv[drvs.dep]].state in (
        StepState.FAILED,
    )


@pytest.mark.nix
async def test_an_unpinned_builder_is_never_used_when_host_keys_are_required(
    make_runner: MakeRunner, nix: Nix, drvs: Drvs
) -> None:
    runner, fake = await _runner_with_builder(make_runner, _builder(None))
    assert runner.comps.config.ssh_require_host_key
    assert runner.comps.ssh.builders == {}
    assert all(v.kind != SSH for v in runner.comps.scheduler.venues.values())
    await _build(runner, nix, drvs)
    await _tick(runner)
    assert fake.calls == []
    resp = await runner.client(Role.CLIENT).get("/api/v1/builders")
    [listed] = resp.json()["builders"]
    assert not listed["usable"] and "ssh_require_host_key" in listed["reason"]
    # A skipped builder answers only what it has (not a usable one's defaults).
    assert list(listed) == ["machine_id", "uri", "kind", "usable", "reason"]


# ---- scheduling order, on the scheduler alone ---------------------------------------------
X86 = "x86_64-linux"
CONFIG = SchedulerSection(lease_secs=60.0, agent_backoff_base_secs=1.0)


def _drv(name: str, features: tuple[str, ...] = ()) -> queries.DrvInfo:
    h = hashlib.sha256(name.encode()).hexdigest()[:32]
    return queries.DrvInfo(
        drv_path=f"/nix/store/{h}-{name}.drv",
        name=name,
        system=X86,
        required_features=frozenset(features),
        outputs={"out": f"/nix/store/{h}-{name}"},
        input_drvs={},
        input_srcs=(),
    )


def _venue(name: str, kind: str, max_jobs: int, outbox: list[BaseModel], **kw: Any) -> Venue:
    return Venue(
        machine_id=name,
        name=name,
        systems=frozenset({X86}),
        supported_features=frozenset(kw.get("features", ())),
        mandatory_features=frozenset(),
        max_jobs=max_jobs,
        speed_factor=kw.get("speed", 1.0),
        send=outbox.append,
        kind=kind,
    )


async def _scheduler(tmp_path: Path, url: str, *drvs: queries.DrvInfo) -> Scheduler:
    engine = create_engine(url)

    async def present(paths: Any) -> set[str]:
        return set()

    sched = Scheduler(engine, CONFIG, LogStore(tmp_path / "logs", 1 << 20), present)
    await sched.load()
    async with engine.begin() as conn:
        for d in drvs:
            await queries.insert_derivation(conn, d)
    await sched.add_build(
        priority=0,
        created_by="test",
        roots={d.drv_path: d.drv_path for d in drvs},
        planned=[PlannedStep(d, ()) for d in drvs],
    )
    return sched


def _assigned(outbox: list[BaseModel]) -> list[str]:
    return sorted(m.drv_path for m in outbox if isinstance(m, p.Assign))


async def test_agents_are_preferred_and_ssh_builders_take_the_rest(
    tmp_path: Path, database_url: str
) -> None:
    a, b, c = _drv("a"), _drv("b"), _drv("c")
    sched = await _scheduler(tmp_path, database_url, a, b, c)
    agent_box: list[BaseModel] = []
    ssh_box: list[BaseModel] = []
    # The SSH builder is faster and bigger: agents still come first.
    sched.attach(_venue("ssh", SSH, 4, ssh_box, speed=10.0), [])
    sched.attach(_venue("agent", AGENT, 2, agent_box), [])
    await sched.tick(sched.clock())
    assert len(_assigned(agent_box)) == 2
    assert len(_assigned(ssh_box)) == 1
    assert set(_assigned(agent_box)) | set(_assigned(ssh_box)) == {
        a.drv_path,
        b.drv_path,
        c.drv_path,
    }


async def test_ssh_builders_get_nothing_while_agents_have_room(
    tmp_path: Path, database_url: str
) -> None:
    sched = await _scheduler(tmp_path, database_url, _drv("a"), _drv("b"), _drv("kvm", ("kvm",)))
    agent_box: list[BaseModel] = []
    ssh_box: list[BaseModel] = []
    sched.attach(_venue("ssh", SSH, 4, ssh_box, features=("kvm",)), [])
    sched.attach(_venue("agent", AGENT, 4, agent_box), [])
    await sched.tick(sched.clock())
    # The agent takes everything it can; only the kvm step (no agent can) goes over SSH.
    assert len(_assigned(agent_box)) == 2
    assert [m.drv_path for m in ssh_box if isinstance(m, p.Assign)] == [
        _drv("kvm", ("kvm",)).drv_path
    ]


async def test_an_ssh_builder_in_backoff_gets_no_work(tmp_path: Path, database_url: str) -> None:
    sched = await _scheduler(tmp_path, database_url, _drv("a"))
    ssh_box: list[BaseModel] = []
    venue = _venue("ssh", SSH, 4, ssh_box)
    sched.attach(venue, [])
    venue.backoff_until = sched.clock() + 60
    await sched.tick(sched.clock())
    assert ssh_box == []
