"""End to end: a step no agent can take is *waiting for capacity*, visibly, and fails as
``unsupported`` after the configured grace; ``bigtent build --timeout`` and SIGTERM stop the
client with what was still pending, and ``--cancel-on-exit`` cancels the build's steps."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import Farm

pytestmark = [pytest.mark.e2e, pytest.mark.nix]

REASON = "waiting for capacity: no agent offers aarch64-linux"


def arm_file(farm: Farm) -> Path:
    """A derivation for aarch64-linux (instantiated here, never built by the x86_64 agent)
    and an x86_64 one, each salted so that no other build shares its step."""
    salt = uuid.uuid4().hex
    path = farm.root / f"arm-{salt[:8]}.nix"
    path.write_text(
        f"""
{{
  arm = derivation {{
    name = "arm-hello"; system = "aarch64-linux"; builder = "/bin/sh";
    args = [ "-c" "echo {salt} > $out" ];
  }};
}}
"""
    )
    return path


def _build(farm: Farm, build_id: int) -> dict[str, Any]:
    with farm.api() as c:
        return dict(c.get(f"/api/v1/builds/{build_id}").json())


def _latest_build(farm: Farm) -> dict[str, Any] | None:
    with farm.api() as c:
        builds = c.get("/api/v1/builds").json()["builds"]
    return _build(farm, builds[0]["id"]) if builds else None


def test_waiting_for_capacity_is_shown_then_fails_unsupported(
    farm_factory: Callable[..., Farm],
) -> None:
    farm = farm_factory(agents=1, scheduler_extra="capacity_grace_secs = 4.0")
    proc = farm.bigtent("build", str(arm_file(farm)), "-A", "arm", "--no-download")
    assert proc.returncode == 1, proc.stderr
    # While it waited, the client said why; at the end, why it failed.
    assert f"arm-hello: {REASON}" in proc.stderr
    assert "unsupported" in proc.stderr
    assert f"{REASON}; gave up after 4." in proc.stderr

    code, out = farm.build_json(str(arm_file(farm)), "-A", "arm", "--no-download")
    assert code == 1
    assert out["state"] == "failed"
    [failed] = out["failed_steps"]
    assert failed["outcome"] == "unsupported"
    assert failed["error"].startswith(REASON)
    with farm.api() as c:
        step = c.get(f"/api/v1/steps/{failed['id']}").json()
    assert (step["state"], step["outcome"], step["waiting_reason"]) == (
        "failed",
        "unsupported",
        None,
    )


def test_timeout_and_sigterm_report_what_was_pending(
    farm_factory: Callable[..., Farm],
) -> None:
    farm = farm_factory(agents=1)  # the default grace: hours

    # --timeout with --json: exit 124, a document naming the waiting step.
    proc = farm.bigtent("build", "--json", "--timeout", "3s", str(arm_file(farm)), "-A", "arm")
    assert proc.returncode == 124, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["stopped"] == "timeout" and doc["cancelled"] is False
    assert doc["state"] in ("queued", "running")
    [waiting] = doc["waiting_for_capacity"]
    assert waiting["reason"] == REASON and waiting["system"] == "aarch64-linux"
    [pending] = doc["pending"]
    assert pending["waiting_reason"] == REASON
    assert "did not end within 3s" in proc.stderr
    assert f"arm-hello: {REASON}" in proc.stderr  # said while it waited, as a warning
    first = int(doc["build_id"])
    # The build goes on on the runner, visibly.
    build = _build(farm, first)
    assert build["state"] == "queued"
    assert build["waiting_for_capacity_count"] == 1
    assert build["waiting_for_capacity"][0]["reason"] == REASON
    status = farm.bigtent("status", check=True)
    assert "waiting for capacity" in status.stdout
    with farm.api() as c:
        assert c.get("/api/v1/status").json()["steps_waiting_for_capacity"] >= 1

    # --timeout, human output.
    proc = farm.bigtent("build", "--timeout", "2s", str(arm_file(farm)), "-A", "arm")
    assert proc.returncode == 124
    assert "no result within 2s: 1 step(s) of build" in proc.stderr
    assert f"arm-hello: runnable ({REASON})" in proc.stderr
    assert "keeps running on the runner; stop it with: bigtent cancel" in proc.stderr

    # A bad duration is a usage error.
    proc = farm.bigtent("build", "--timeout", "soon", str(arm_file(farm)), "-A", "arm")
    assert proc.returncode == 2
    assert "--timeout needs a positive duration" in proc.stderr

    # SIGTERM: the same notice as Ctrl-C (SIGINT); then with --cancel-on-exit.
    for sig, cancel, code, why in [
        (signal.SIGINT, False, 130, "interrupted"),
        (signal.SIGTERM, False, 143, "terminated (SIGTERM)"),
        (signal.SIGTERM, True, 143, "terminated (SIGTERM)"),
    ]:
        build_id, got, err = _stopped_client(farm, sig, cancel=cancel)
        assert got == code, err
        assert f"{why}: 1 step(s) of build {build_id} pending:" in err
        assert f"arm-hello: runnable ({REASON})" in err
        if sig == signal.SIGTERM:
            assert "Error: terminated (SIGTERM)" in err
        final = _build(farm, build_id)
        with farm.api() as c:
            steps = c.get(f"/api/v1/builds/{build_id}/steps").json()["steps"]
        if cancel:
            assert f"build {build_id} cancelled" in err
            assert final["state"] == "cancelled"
            assert [s["state"] for s in steps] == ["cancelled"]
        else:
            assert f"stop it with: bigtent cancel {build_id}" in err
            assert final["state"] == "queued"
            assert [s["state"] for s in steps] == ["runnable"]
            assert steps[0]["waiting_reason"] == REASON


def _stopped_client(farm: Farm, sig: int, *, cancel: bool) -> tuple[int, int, str]:
    """Start ``bigtent build`` on a new aarch64 step, wait until the runner says its build
    waits for capacity, send the client ``sig``. Returns the build id, the client's exit code
    and its stderr."""
    latest = _latest_build(farm)
    before = int(latest["id"]) if latest else 0
    args = ["--cancel-on-exit"] if cancel else []
    client = subprocess.Popen(
        [sys.executable, "-m", "bigtent", "build", *args, str(arm_file(farm)), "-A", "arm"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=farm.env(),
        cwd=farm.root,
        # As from a terminal: a CI job run in the background of a non-interactive shell
        # inherits SIGINT ignored, and an ignored SIGINT stays ignored across exec.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen: dict[str, Any] = {}

    def waiting_here() -> bool:
        build = _latest_build(farm)
        if build is None or int(build["id"]) <= before or build["state"] != "queued":
            return False
        seen.update(build)
        return bool(build["waiting_for_capacity_count"])

    try:
        wait_until(waiting_here, timeout=60, what="the client's build to wait for capacity")
        client.send_signal(sig)
        _, err = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    return int(seen["id"]), client.returncode, err
