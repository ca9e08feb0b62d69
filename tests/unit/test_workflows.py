"""The GitHub workflows: the agent workflow's interface (inputs, permissions, what it runs), its
run scripts executed by bash with hostile inputs, the CI workflow's single cache writer, pinned
actions, and actionlint over both."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"
AGENT = WORKFLOWS / "bigtent-agent.yml"
CI = WORKFLOWS / "ci.yml"
AGENT_INPUTS = {
    "runner_url",
    "audience",
    "systems",
    "supported_features",
    "mandatory_features",
    "max_jobs",
    "launch_id",
    "bigtent_version",
}
"""What the autoscaler may send (architecture §7 and issue 5); ``name`` is an optional extra."""
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def load(path: Path) -> dict[str, Any]:
    raw: dict[Any, Any] = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the key `on` as the boolean true.
    return {"on" if key is True else str(key): value for key, value in raw.items()}


def steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


@pytest.mark.parametrize("path", [AGENT, CI], ids=lambda p: p.name)
def test_no_expression_is_interpolated_into_a_script(path: Path) -> None:
    """Script injection: values reach `run:` scripts through `env:` only."""
    for step in steps(load(path)):
        assert "${{" not in step.get("run", ""), step


@pytest.mark.parametrize("path", [AGENT, CI], ids=lambda p: p.name)
def test_every_action_is_pinned_to_a_commit(path: Path) -> None:
    uses = [step["uses"] for step in steps(load(path)) if "uses" in step]
    assert uses
    for ref in uses:
        assert PINNED.match(ref), ref


def test_the_agent_workflow_interface() -> None:
    wf = load(AGENT)
    inputs = wf["on"]["workflow_dispatch"]["inputs"]
    assert set(inputs) - {"name"} == AGENT_INPUTS
    assert all(spec["type"] == "string" for spec in inputs.values())
    assert wf["permissions"] == {"contents": "read", "id-token": "write"}
    [job] = wf["jobs"].values()
    env_values = [v for step in job["steps"] for v in step.get("env", {}).values()]
    for name in inputs:
        assert f"${{{{ inputs.{name} }}}}" in env_values, name
    run = job["steps"][-1]["run"]
    assert run.lstrip().startswith('exec "$RUNNER_TEMP/bigtent/bin/bigtent" agent')
    assert "--ephemeral" in run and "--oidc github" in run


def _run_step(name: str) -> dict[str, Any]:
    [step] = [s for s in steps(load(AGENT)) if s.get("name") == name]
    return step


HOSTILE = {
    "runner_url": 'https://ci.example.org:8443"; touch pwned; echo "',
    "audience": "$(touch pwned)",
    "systems": "x86_64-linux, i686-linux,",
    "supported_features": "kvm,`touch pwned`",
    "mandatory_features": "",
    "max_jobs": "2",
    "launch_id": "L-1; touch pwned",
    "name": "pool 'a'",
}


def test_the_agent_step_passes_hostile_inputs_as_single_arguments(tmp_path: Path) -> None:
    """Run the workflow's own script with bash, a stand-in `bigtent` recording its argv."""
    fake = tmp_path / "bigtent" / "bin" / "bigtent"
    fake.parent.mkdir(parents=True)
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'launch': os.environ.get('BIGTENT_LAUNCH_ID')},"
        " open(os.environ['RECORD'], 'w'))\n"
    )
    fake.chmod(0o755)
    step = _run_step("Run the agent")
    inputs = {**HOSTILE}
    env = {
        key: re.sub(r"\$\{\{ inputs\.(\w+) \}\}", lambda m: inputs[m.group(1)], value)
        for key, value in step["env"].items()
    }
    record = tmp_path / "argv.json"
    env |= {"RUNNER_TEMP": str(tmp_path), "RECORD": str(record), "PATH": os.environ["PATH"]}
    subprocess.run(["bash", "-e", "-c", step["run"]], env=env, cwd=tmp_path, check=True)
    got = json.loads(record.read_text())
    assert got["launch"] == HOSTILE["launch_id"]
    argv = got["argv"]
    assert argv[:4] == ["agent", "--ephemeral", "--oidc", "github"]
    pairs = dict(zip(argv[4::2], argv[5::2], strict=True))
    assert pairs == {
        "--audience": HOSTILE["audience"],
        "--runner-url": HOSTILE["runner_url"],
        "--name": HOSTILE["name"],
        "--system": HOSTILE["systems"],
        "--supported-feature": HOSTILE["supported_features"],
        "--mandatory-feature": "",
        "--max-jobs": "2",
        "--work-dir": f"{tmp_path}/bigtent-agent",
    }
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("0.1.0", True),
        ("1.2.3rc1", True),
        ("0.1.0.post1", True),
        ("2.0.0.dev3", True),
        ("", False),
        ("latest", False),
        ("0.1.0 --index-url https://evil.example", False),
        ("0.1.0; touch pwned", False),
        (">=0.1", False),
    ],
)
def test_the_install_step_takes_only_a_release_version(
    tmp_path: Path, version: str, ok: bool
) -> None:
    """The version check alone (python3 and pip replaced by stand-ins that record calls)."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    (bindir / "python3").write_text(
        '#!/bin/sh\necho "python3 $*" >> "$CALLS"\nmkdir -p "$3/bin"\n'
        'printf \'#!/bin/sh\\necho "pip $*" >> "$CALLS"\\n\' > "$3/bin/pip"\n'
        'printf \'#!/bin/sh\\necho "bigtent $*" >> "$CALLS"\\n\' > "$3/bin/bigtent"\n'
        'chmod +x "$3/bin/pip" "$3/bin/bigtent"\n'
    )
    (bindir / "python3").chmod(0o755)
    step = _run_step("Install bigtent")
    env = {
        "BIGTENT_VERSION": version,
        "RUNNER_TEMP": str(tmp_path),
        "CALLS": str(calls),
        "PATH": f"{bindir}:{os.environ['PATH']}",
    }
    proc = subprocess.run(["bash", "-e", "-c", step["run"]], env=env, capture_output=True)
    if ok:
        assert proc.returncode == 0, proc.stderr
        assert f"pip install --disable-pip-version-check -q bigtent=={version}" in calls.read_text()
    else:
        assert proc.returncode == 2
        assert b"bigtent_version must be a release version" in proc.stdout
        assert not calls.exists()


def test_ci_has_one_cache_key_and_one_writer() -> None:
    wf = load(CI)
    cache_steps = [
        (job_id, step)
        for job_id, job in wf["jobs"].items()
        for step in job["steps"]
        if step.get("uses", "").startswith("actions/cache")
    ]
    kinds = [(job, step["uses"].split("@")[0]) for job, step in cache_steps]
    savers = [job for job, kind in kinds if kind == "actions/cache/save"]
    assert savers == ["test"]
    assert {kind for _, kind in kinds} == {"actions/cache/restore", "actions/cache/save"}
    restorers = {job for job, kind in kinds if kind == "actions/cache/restore"}
    assert restorers == set(wf["jobs"]) - {"cache-key"}
    keys = {step["with"]["key"] for _, step in cache_steps}
    assert keys == {"${{ needs.cache-key.outputs.key }}"}
    paths = {step["with"]["path"] for _, step in cache_steps}
    assert len(paths) == 1  # the same paths, or the restore never finds the saved entry
    assert {"/nix/store", "/home/runner/.cache/pip"} <= set(paths.pop().split())


def test_ci_runs_the_tests_through_ci_run() -> None:
    runs = [step.get("run", "") for step in steps(load(CI))]
    assert any("CI_STEPS=test bash .ci/run" in run for run in runs)
    assert any("make lint" in run for run in runs)


def _actionlint() -> str | None:
    local = Path(sys.executable).parent / "actionlint"
    return str(local) if local.exists() else shutil.which("actionlint")


@pytest.mark.skipif(_actionlint() is None, reason="actionlint is not installed")
def test_actionlint_accepts_the_workflows() -> None:
    binary = _actionlint()
    assert binary is not None
    proc = subprocess.run(
        [binary, "-no-color", str(AGENT), str(CI)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
