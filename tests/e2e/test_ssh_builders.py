"""End to end: ``[[ssh_builders]]`` with a real sshd on 127.0.0.1 (its own host key, a free
port) whose Nix store is a separate directory, named in the builder URI
(``?remote-store=DIR``), as a builder whose store is not ``/nix`` would be configured. Nothing
of the machine is assumed beyond Nix, sshd and the build users (``scripts/install-deps.sh``):
no ``/nix`` mount point, no nix.conf. The runner builds through Nix's build hook, hardened."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import current_system, nix_children_see_our_root, wait_until
from tests.e2e.conftest import HOST_TOOLS, Farm, free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.nix,
    pytest.mark.ssh,
    pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="needs /usr/sbin/sshd"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (sshd, a root login)"),
]


@dataclass
class Sshd:
    dir: Path
    port: int
    host_key: str
    client_key: Path
    log: Path
    nix_root: Path
    """The builder's store: a chroot store (``local?root=…``) on this machine."""
    proc: subprocess.Popen[bytes]

    @property
    def uri(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}?remote-store={self.nix_root}"

    @property
    def name(self) -> str:
        return f"root@127.0.0.1:{self.port}"

    def remote_store_has(self, path: str) -> bool:
        return (self.nix_root / "nix" / "store" / Path(path).name).exists()

    def connections(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if "Connection from" in line]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    d = tmp_path / "sshd"
    d.mkdir()
    _keygen(d / "host")
    _keygen(d / "client")
    shutil.copy(d / "client.pub", d / "authorized_keys")
    nix_root = d / "remote-root"
    port = free_port()
    # The builder's Nix (nix-store --serve --write --store NIX_ROOT) builds in its sandbox as
    # the machine's nixbld users, like any Nix run as root: only the host tools its /bin/sh
    # builders need are mapped in, from its own nix.conf. Its build users are the host's, and
    # so is their lock directory (/nix/var/nix/userpool: chroot stores share it), so a remote
    # build never takes a build user a host build holds.
    conf_dir = d / "nix-conf"
    conf_dir.mkdir()
    (conf_dir / "nix.conf").write_text(f"extra-sandbox-paths = {' '.join(HOST_TOOLS)}\n")
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nLogLevel VERBOSE\n"
        f"SetEnv NIX_CONF_DIR={conf_dir}\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    log = d / "sshd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
            stderr=out,
            start_new_session=True,
        )
    server = Sshd(
        d,
        port,
        " ".join((d / "host.pub").read_text().split()[:2]),
        d / "client",
        log,
        nix_root,
        proc,
    )
    try:
        # Not by connecting: test 3 checks that nothing ever connects.
        wait_until(
            lambda: "Server listening" in log.read_text() or proc.poll() is not None,
            timeout=10,
            what="sshd to listen",
        )
        assert proc.poll() is None, log.read_text()
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _builder_toml(sshd: Sshd, host_key: str | None) -> str:
    pin = f'host_key = "{host_key}"\n' if host_key else ""
    return (
        f'\n[[ssh_builders]]\nuri = "{sshd.uri}"\nsystems = ["{current_system()}"]\nmax_jobs = 2\n'
        f'ssh_key = "{sshd.client_key}"\n{pin}'
    )


@pytest.fixture
def patient_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner retries infrastructure failures many times (test 2 waits for an agent)."""
    spawn = Farm._spawn

    def _spawn(self: Farm, name: str, args: list[str], env: dict[str, str]) -> Any:
        if name == "runner":
            env = {**env, "BIGTENT_SCHEDULER__MAX_INFRA_ATTEMPTS": "1000"}
        return spawn(self, name, args, env)

    monkeypatch.setattr(Farm, "_spawn", _spawn)


def _builders(farm: Farm) -> list[dict[str, Any]]:
    with farm.api() as c:
        resp = c.get("/api/v1/builders")
    assert resp.status_code == 200, resp.text
    return list(resp.json()["builders"])


def _steps(farm: Farm, build_id: int) -> dict[str, dict[str, Any]]:
    with farm.api() as c:
        steps = c.get(f"/api/v1/builds/{build_id}/steps").json()["steps"]
    return {str(s["name"]): s for s in steps}


@nix_children_see_our_root
def test_a_dag_builds_on_the_ssh_builder_and_substitutes_from_the_cache(
    farm_factory: Callable[..., Farm], sshd: Sshd, tmp_path: Path
) -> None:
    farm = farm_factory(agents=0, runner_extra=_builder_toml(sshd, sshd.host_key))
    dag = farm.dag_file(layers=2, width=2)
    code, out = farm.build_json(str(dag), "-A", "top", "--no-download", timeout=180)
    assert code == 0, (out, sshd.log.read_text()[-2000:])
    steps = _steps(farm, out["build_id"])
    assert len(steps) == 5
    assert {s["agent_name"] for s in steps.values()} == {sshd.name}
    outputs = [str(o) for s in steps.values() for o in s["outputs"].values()]
    assert all(sshd.remote_store_has(o) for o in outputs), "built on the builder's own store"
    fresh = subprocess.run(
        [
            "nix-store",
            "--store",
            f"local?root={tmp_path / 'fresh'}",
            "--realise",
            *outputs,
            "--option",
            "substituters",
            farm.cache_url,
            "--option",
            "trusted-public-keys",
            farm.public_key,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path / "xdg")},
    )
    assert fresh.returncode == 0, fresh.stderr
    for path in outputs:
        assert (tmp_path / "fresh" / path.lstrip("/")).exists()
    [listed] = _builders(farm)
    assert listed["usable"] and listed["running"] == 0 and not listed["in_backoff"]


def test_a_wrong_pinned_host_key_is_refused_and_backed_off(
    farm_factory: Callable[..., Farm], sshd: Sshd, tmp_path: Path, patient_runner: None
) -> None:
    _keygen(tmp_path / "impostor")
    wrong = " ".join((tmp_path / "impostor.pub").read_text().split()[:2])
    farm = farm_factory(agents=0, runner_extra=_builder_toml(sshd, wrong))
    dag = farm.dag_file(layers=1, width=1)
    argv = [sys.executable, "-m", "bigtent", "build", "--json", str(dag), "-A", "top"]
    client = subprocess.Popen(
        [*argv, "--no-download"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=farm.env(),
        cwd=farm.root,
    )
    try:

        def backed_off() -> bool:
            [b] = _builders(farm)
            return bool(b["in_backoff"]) and b["consecutive_failures"] >= 1

        wait_until(backed_off, timeout=60, what="the SSH builder to be backed off")
        with farm.api() as c:
            [build] = c.get("/api/v1/builds").json()["builds"]
            [step] = c.get(f"/api/v1/builds/{build['id']}/steps").json()["steps"][:1]
            text = c.get(f"/api/v1/steps/{step['id']}/log").text
        assert "Host key verification failed" in text, text
        assert not list((sshd.nix_root / "nix" / "store").glob("*-dag-*")), "nothing built there"
        farm.start_agent("a0")
        out, err = client.communicate(timeout=180)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
    assert client.returncode == 0, (out, err)
    build = json.loads(out)
    steps = _steps(farm, build["build_id"])
    assert {s["agent_name"] for s in steps.values()} == {"a0"}


def test_an_unpinned_builder_is_never_contacted(
    farm_factory: Callable[..., Farm], sshd: Sshd
) -> None:
    farm = farm_factory(agents=0, runner_extra=_builder_toml(sshd, None))
    [listed] = _builders(farm)
    assert not listed["usable"] and "ssh_require_host_key" in listed["reason"]
    dag = farm.dag_file(layers=1, width=1)
    client = subprocess.Popen(
        [sys.executable, "-m", "bigtent", "build", str(dag), "-A", "top", "--no-download"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=farm.env(),
        cwd=farm.root,
    )
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and client.poll() is None:
            time.sleep(0.1)
    finally:
        client.kill()
        client.wait(10)
    assert sshd.connections() == []
    assert farm.runner is not None
    assert "has no host_key and ssh_require_host_key = true" in farm.runner.log.read_text()
