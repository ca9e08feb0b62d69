"""Plain ``nix-build`` / ``nix build`` building on the farm through ``bigtent-nix-hook``.

Real Nix: the client's store is a chroot store with ``max-jobs = 0`` (it cannot build
anything itself), the hook is configured by ``--option build-hook``, exactly as nix.conf
would (docs/nix-integration.md).
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bigtent.nix.keys import generate_key
from tests.conftest import current_system
from tests.e2e.conftest import Farm, free_port
from tests.github_actions import REPOSITORY, ActionsTokenEndpoint, running_endpoint
from tests.integration.runner.oidc_issuer import LocalIssuer, SigningKey, TlsFiles

pytestmark = [pytest.mark.e2e, pytest.mark.nix]

HOOK = Path(sys.executable).parent / "bigtent-nix-hook"


def hook_setting(runner_url: str, token_file: Path, *extra: str) -> str:
    """A wrapper script with the hook's options, as docs/nix-integration.md shows (Nix 2.8
    takes ``build-hook`` as one path, without arguments)."""
    script = token_file.with_suffix(".hook")
    # A socket path of its own (short: AF_UNIX paths end at 108 bytes); the helper the first
    # hook starts exits 3 s after its last derivation.
    sock = Path(tempfile.mkdtemp(prefix="bt-hook-")) / "h.sock"
    args = [str(HOOK), "--runner", runner_url, "--token-file", str(token_file)]
    args += ["--socket", str(sock), "--helper-idle", "3", *extra]
    script.write_text("#!/bin/sh\nexec " + " ".join(f"'{a}'" for a in args) + ' "$@"\n')
    script.chmod(0o755)
    return str(script)


def nix(
    farm: Farm,
    store: Path,
    hook: str,
    *args: str,
    tool: str = "nix-build",
    max_jobs: int = 0,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run a plain Nix command against the client's chroot store with the hook configured."""
    argv = [tool]
    if tool == "nix":  # the subcommand (one word, or "flake check") comes first
        words = 2 if args[0] == "flake" else 1
        argv += [*args[:words], "--extra-experimental-features", "nix-command flakes"]
        args = args[words:]
    argv += [
        "--option", "build-hook", hook,
        "--option", "max-jobs", str(max_jobs),
        "--option", "substituters", "",
        "--option", "extra-sandbox-paths", "/bin=/usr/bin /usr /lib=/usr/lib /lib64=/usr/lib64",
        *args,
    ]  # fmt: skip
    env = farm.env(NIX_REMOTE=f"local?root={store}", XDG_CACHE_HOME=str(store) + "-xdg")
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)


def token_file(farm: Farm, token: str | None = None) -> Path:
    path = farm.root / f"token-{time.monotonic_ns()}.txt"
    path.write_text((token or farm.client_token) + "\n")
    return path


def store_query(store: Path, *args: str) -> str:
    out = subprocess.run(
        ["nix-store", "--store", f"local?root={store}", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def farm_steps(farm: Farm) -> list[dict[str, object]]:
    """Every step of every build on the runner."""
    steps: list[dict[str, object]] = []
    with farm.api() as c:
        builds = c.get("/api/v1/builds", params={"limit": 500}).json()["builds"]
        for build in builds:
            steps += c.get(f"/api/v1/builds/{build['id']}/steps").json()["steps"]
    return steps


def test_nix_build_builds_a_dag_on_the_farm(
    farm_factory: Callable[..., Farm], tmp_path: Path
) -> None:
    farm = farm_factory(agents=2)
    store = tmp_path / "client"
    hook = hook_setting(farm.url, token_file(farm), "--public-key", farm.public_key)
    dag = farm.dag_file(layers=5, width=6, fanIn=2)
    drv = subprocess.run(
        ["nix-instantiate", "--store", f"local?root={store}", str(dag), "-A", "top"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    drvs = {
        p for p in store_query(store, "--query", "--requisites", drv).split() if p.endswith(".drv")
    }
    assert len(drvs) == 31  # 30 nodes and the top

    started = time.monotonic()
    first = nix(farm, store, hook, str(dag), "-A", "top", "--no-out-link")
    took = time.monotonic() - started
    assert first.returncode == 0, first.stderr[-4000:] + farm.logs()
    out = first.stdout.strip().splitlines()[-1]
    assert (store / out.lstrip("/")).read_text().startswith("top-0 ")
    # Every derivation was built by an agent of the farm, once (max-jobs = 0: Nix could not
    # build any itself), and each went through the hook.
    built = {s["drv_path"]: s for s in farm_steps(farm) if s["state"] == "succeeded"}
    assert set(built) == drvs
    assert all(s["agent_name"] in ("a0", "a1") for s in built.values())
    assert first.stderr.count("on 'bigtent'") == 31
    # The outputs are in the local store, signed by the runner's key, and Nix agrees.
    sigs = store_query(store, "--query", "--requisites", out)
    for path in sigs.split():
        info = subprocess.run(
            ["nix", "--extra-experimental-features", "nix-command", "path-info", "--json",
             "--sigs", "--store", f"local?root={store}", path],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        key_name = farm.public_key.split(":", 1)[0]
        assert any(s.startswith(key_name + ":") for s in json.loads(info)[0]["signatures"])
    verify = subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "store", "verify",
         "--store", f"local?root={store}", "--recursive", "--sigs-needed", "1",
         "--option", "trusted-public-keys", farm.public_key, out],
        capture_output=True, text=True,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    print(f"nix-build of 31 derivations through the hook: {took:.1f} s")

    # A second run builds nothing: the outputs are valid locally, the hook is not asked.
    steps_before = len(farm_steps(farm))
    again = nix(farm, store, hook, str(dag), "-A", "top", "--no-out-link")
    assert again.returncode == 0, again.stderr
    assert "on 'bigtent'" not in again.stderr
    assert len(farm_steps(farm)) == steps_before

    # A fresh local store: the farm has built everything already, nothing is built again.
    fresh = tmp_path / "fresh"
    third = nix(farm, fresh, hook, str(dag), "-A", "top", "--no-out-link")
    assert third.returncode == 0, third.stderr[-3000:]
    assert len(farm_steps(farm)) == steps_before
    assert third.stdout.strip().splitlines()[-1] == out


def test_failure_and_logs_reach_nix(farm_factory: Callable[..., Farm], tmp_path: Path) -> None:
    farm = farm_factory(agents=1)
    store = tmp_path / "client"
    hook = hook_setting(farm.url, token_file(farm))
    dag = farm.dag_file(layers=2, width=2, fanIn=1, failing=["1-1"])

    # nix build -L shows the agent's log lines, prefixed by the derivation's name.
    ok = nix(
        farm, store, hook, "build", "-f", str(dag), "nodes.dag-1-0", "-L", "--no-link", tool="nix"
    )
    assert ok.returncode == 0, ok.stderr
    assert "> building node 1-0" in ok.stderr

    # A failing derivation fails nix-build (exit 100, as a local build failure) with its log.
    bad = nix(farm, store, hook, str(dag), "-A", "nodes.dag-1-1", "--no-out-link")
    assert bad.returncode == 100, bad.stderr
    assert "node 1-1 fails on purpose" in bad.stderr
    assert "dag-1-1.drv" in bad.stderr

    # Outputs signed by another key than the one the hook trusts never enter the store.
    other = generate_key("someone-else-1").public_key().to_text()
    pinned = hook_setting(farm.url, token_file(farm), "--public-key", other)
    fresh = tmp_path / "fresh"
    refused = nix(farm, fresh, pinned, str(dag), "-A", "nodes.dag-0-1", "--no-out-link")
    assert refused.returncode != 0
    assert "signature" in refused.stderr, refused.stderr
    assert not any(p.name.endswith("-dag-0-1") for p in (fresh / "nix/store").iterdir())


GATE_POLLS = 1200
"""The gated builder gives up after this many 50 ms polls (one minute): a test that died
must not leave a build hanging."""


def test_the_log_reaches_nix_while_the_step_runs(
    farm_factory: Callable[..., Farm], tmp_path: Path
) -> None:
    """The builder prints a marker, then waits for a file the test creates only once it has
    read the marker in nix-build's output: the build can only end when the log is live."""
    gate = tmp_path / "gate"
    gate.mkdir()
    farm = farm_factory(agents=1, sandbox_paths=[f"/gate={gate}"])
    store = tmp_path / "client"
    hook = hook_setting(farm.url, token_file(farm))
    salt = uuid.uuid4().hex
    expr = tmp_path / "gated.nix"
    expr.write_text(
        f"""derivation {{
  name = "gated"; salt = "{salt}"; system = "{current_system()}";
  builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  args = [ "-c" ''
    echo "gated: before the gate {salt}"
    i=0
    while [ ! -e /gate/open ]; do
      i=$((i + 1))
      if [ $i -gt {GATE_POLLS} ]; then echo "gave up waiting for the gate" >&2; exit 1; fi
      sleep 0.05
    done
    echo "gated: after the gate"
    echo ok > $out
  '' ];
}}
"""
    )
    env = farm.env(NIX_REMOTE=f"local?root={store}", XDG_CACHE_HOME=str(store) + "-xdg")
    proc = subprocess.Popen(
        ["nix-build", "--option", "build-hook", hook, "--option", "max-jobs", "0",
         "--option", "substituters", "", str(expr), "--no-out-link"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not any(f"before the gate {salt}" in line for line in seen):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "nix-build ended before the marker:\n" + "".join(seen)
            seen.append(line)
        assert proc.poll() is None  # the step still runs: it waits for the gate
        (gate / "open").touch()
        proc.wait(timeout=120)  # stderr is the reader thread's; stdout is one line
        assert proc.stdout is not None
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    text = "".join(seen)
    assert proc.returncode == 0, text[-3000:] + farm.logs()
    assert "gated: after the gate" in text, text
    assert text.index("gated: after the gate") > text.index(f"before the gate {salt}")
    assert text.count("gated: after the gate") == 1  # streamed once, not fetched again
    assert (store / out.strip().lstrip("/")).read_text() == "ok\n"


def test_unreachable_runner_and_refused_token_fail_fast(
    farm_factory: Callable[..., Farm], tmp_path: Path
) -> None:
    farm = farm_factory(agents=0)
    dag = farm.dag_file(layers=1, width=1)

    nowhere_url = f"http://127.0.0.1:{free_port()}"
    # In the hook process itself (--no-helper) here; the refused token below goes through the
    # helper.
    nowhere = hook_setting(nowhere_url, token_file(farm), "--no-helper")
    started = time.monotonic()
    down = nix(farm, tmp_path / "s1", nowhere, str(dag), "-A", "top", "--no-out-link", timeout=60)
    assert down.returncode != 0
    assert time.monotonic() - started < 15
    assert "cannot reach runner" in down.stderr, down.stderr

    refused = hook_setting(farm.url, token_file(farm, "not-a-token"))
    started = time.monotonic()
    bad = nix(farm, tmp_path / "s2", refused, str(dag), "-A", "top", "--no-out-link", timeout=60)
    assert bad.returncode != 0
    assert time.monotonic() - started < 15
    assert "401" in bad.stderr or "token" in bad.stderr.lower(), bad.stderr

    # on-unreachable = local: Nix builds it itself (it may: max-jobs 1).
    local = nix(
        farm,
        tmp_path / "s3",
        hook_setting(nowhere_url, token_file(farm), "--on-unreachable", "local"),
        str(dag),
        "-A",
        "top",
        "--no-out-link",
        max_jobs=1,
        timeout=60,
    )
    assert local.returncode == 0, local.stderr
    assert "Nix builds locally" in local.stderr
    with httpx.Client(base_url=farm.url) as c:
        assert c.get("/cache/nix-cache-info").status_code == 200


@pytest.fixture
def endpoint(issuer: LocalIssuer, key: SigningKey) -> Iterator[ActionsTokenEndpoint]:
    yield from running_endpoint(issuer, key)


def test_a_ci_job_builds_with_its_oidc_token(
    farm_factory: Callable[..., Farm],
    tmp_path: Path,
    issuer: LocalIssuer,
    tls: TlsFiles,
    endpoint: ActionsTokenEndpoint,
) -> None:
    """No stored secret: the hook asks the job for its ID token; the runner's rule lets such
    tokens act as a client; the build is untrusted, carries the job's repository, runs on an
    untrusted agent and its outputs come from the untrusted cache."""
    rule = f"""
[[auth.oidc]]
issuer = "{issuer.url}"
audiences = ["bigtent"]
ca_file = "{tls.ca_file}"
repositories = ["{REPOSITORY}"]
clients = true
"""
    farm = farm_factory(runner_extra=rule)
    farm.start_agent("u0", agent_extra="untrusted = true")
    store = tmp_path / "client"
    sock = Path(tempfile.mkdtemp(prefix="bt-hook-")) / "h.sock"
    script = tmp_path / "oidc-hook"
    script.write_text(
        f"#!/bin/sh\nexec {HOOK} --runner {farm.url} --oidc github --audience bigtent "
        f'--socket {sock} --helper-idle 3 "$@"\n'
    )
    script.chmod(0o755)
    dag = farm.dag_file(layers=1, width=1)
    env = endpoint.env()
    result = subprocess.run(
        ["nix-build", "--option", "build-hook", str(script), "--option", "max-jobs", "0",
         "--option", "substituters", "", str(dag), "-A", "nodes.dag-0-0", "--no-out-link"],
        capture_output=True, text=True, timeout=240,
        env=farm.env(NIX_REMOTE=f"local?root={store}", XDG_CACHE_HOME=str(tmp_path / "xdg"),
                     BIGTENT_TOKEN="", **env),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert endpoint.requests >= 1 and endpoint.audiences[0] == "bigtent"
    with farm.api() as c:
        build = c.get("/api/v1/builds").json()["builds"][0]
    assert build["trusted"] is False
    assert build["repository"] == REPOSITORY
    out = result.stdout.strip().splitlines()[-1]
    assert (store / out.lstrip("/")).read_text().startswith("0-0 ")


def test_oidc_tokens_act_as_clients_only_where_the_rule_says_so(
    farm_factory: Callable[..., Farm],
    issuer: LocalIssuer,
    tls: TlsFiles,
    endpoint: ActionsTokenEndpoint,
) -> None:
    """Without ``clients = true`` an ID token the rule admits for agents is refused (403) by
    the client routes; an admitted one gets no admin route."""
    rule = f"""
[[auth.oidc]]
issuer = "{issuer.url}"
audiences = ["bigtent"]
ca_file = "{tls.ca_file}"
repositories = ["{REPOSITORY}"]
"""
    farm = farm_factory(runner_extra=rule)
    token = httpx.get(
        endpoint.request_url + "&audience=bigtent",
        headers={"Authorization": f"Bearer {endpoint.request_token}"},
    ).json()["value"]
    with farm.api(token) as c:
        assert c.post("/api/v1/paths/missing", json={"paths": []}).status_code in (401, 403)
        assert c.get("/api/v1/builds").status_code in (401, 403)


def test_nix_flake_check_builds_on_the_farm(
    farm_factory: Callable[..., Farm], tmp_path: Path
) -> None:
    farm = farm_factory(agents=1)
    store = tmp_path / "client"
    hook = hook_setting(farm.url, token_file(farm))
    flake = tmp_path / "flake"
    flake.mkdir()
    salt = uuid.uuid4().hex
    (flake / "flake.nix").write_text(
        """{
  outputs = { self }: let
    mk = name: derivation {
      inherit name; system = "%s"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
      salt = "%s"; args = [ "-c" "echo building ${name}; echo ${name} > $out" ];
    };
  in {
    packages.%s.default = mk "flake-pkg";
    checks.%s.c1 = mk "flake-check-1";
  };
}
"""
        % ((current_system(), salt) + (current_system(),) * 2)
    )
    check = nix(farm, store, hook, "flake", "check", f"path:{flake}", "-L", tool="nix")
    assert check.returncode == 0, check.stderr
    assert "flake-check-1.drv' on 'bigtent'" in check.stderr
    assert "> building flake-check-1" in check.stderr
    built = nix(farm, store, hook, "build", f"path:{flake}", "--no-link", "--json", tool="nix")
    assert built.returncode == 0, built.stderr
    out = json.loads(built.stdout)[0]["outputs"]["out"]
    assert (store / out.lstrip("/")).read_text() == "flake-pkg\n"
