"""The start-up probe against real Nix: a chroot store with the agent's own options builds it
(and keeps none of its paths); a store whose build users are missing fails with the hint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bigtent.agent.probe import HINTS, PROBE_NAME, ProbeCause, run_probe
from bigtent.agent.stepstore import CacheSettings, step_store
from bigtent.config import AgentSection
from bigtent.errors import AgentCannotBuild

pytestmark = [
    pytest.mark.nix,
    pytest.mark.skipif(shutil.which("nix-store") is None, reason="needs Nix"),
]


def _section(tmp_path: Path, extra_nix_options: dict[str, str] | None = None) -> AgentSection:
    return AgentSection(
        store=f"local?root={tmp_path / 'root'}",
        work_dir=tmp_path / "work",
        extra_nix_options=extra_nix_options or {},
    )


def _probe_paths(tmp_path: Path) -> list[Path]:
    """The probe's store paths (a failed build leaves Nix's ``.lock`` file, no path)."""
    store_dir = tmp_path / "root" / "nix" / "store"
    if not store_dir.exists():
        return []
    return [p for p in store_dir.iterdir() if PROBE_NAME in p.name and p.suffix != ".lock"]


async def test_probe_builds_without_host_tools_and_leaves_nothing(tmp_path: Path) -> None:
    # No sandbox_paths: the sandbox has no /bin/sh, as on an agent without host tools.
    store = step_store(_section(tmp_path), CacheSettings("", ""), "probe")
    secs = await run_probe(store, nonce="first")
    assert secs > 0
    assert _probe_paths(tmp_path) == []
    # A second start builds anew (another nonce) and still leaves nothing.
    await run_probe(store)
    assert _probe_paths(tmp_path) == []


async def test_probe_fails_with_nix_error_and_hint(tmp_path: Path) -> None:
    section = _section(tmp_path, extra_nix_options={"build-users-group": "nosuchgroup"})
    store = step_store(section, CacheSettings("", ""), "probe")
    with pytest.raises(AgentCannotBuild) as info:
        await run_probe(store)
    message = info.value.message
    assert "the group 'nosuchgroup' specified in 'build-users-group' does not exist" in message
    assert message.endswith("hint: " + HINTS[ProbeCause.BUILD_USERS])
    assert info.value.exit_code == 6
    assert _probe_paths(tmp_path) == []
