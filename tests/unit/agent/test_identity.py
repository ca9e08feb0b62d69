"""The persistent agent identity: machine id file, default name, systems."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from bigtent.agent.identity import (
    MACHINE_ID_FILE,
    default_name,
    load_machine_id,
    persistent_identity,
    resolve_systems,
)
from bigtent.config import AgentSection
from bigtent.errors import ConfigError
from bigtent.nix.store import NixStore


class FakeNix(NixStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def current_system(self) -> str:
        self.calls += 1
        return "aarch64-linux"


def test_machine_id_is_created_private_and_reused(tmp_path: Path) -> None:
    work = tmp_path / "work"
    first = load_machine_id(work)
    path = work / MACHINE_ID_FILE
    assert len(first) == 32 and int(first, 16) >= 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_machine_id(work) == first
    assert [p.name for p in work.iterdir()] == [MACHINE_ID_FILE]


def test_other_work_dirs_get_other_ids(tmp_path: Path) -> None:
    assert load_machine_id(tmp_path / "a") != load_machine_id(tmp_path / "b")


def test_garbage_machine_id_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / MACHINE_ID_FILE).write_text("not an id!\n")
    with pytest.raises(ConfigError, match="delete it"):
        load_machine_id(tmp_path)


async def test_systems_default_to_the_current_system() -> None:
    nix = FakeNix()
    assert await resolve_systems(AgentSection(), nix) == ("aarch64-linux",)
    assert await resolve_systems(AgentSection(systems=["x86_64-linux", "i686-linux"]), nix) == (
        "x86_64-linux",
        "i686-linux",
    )
    assert nix.calls == 1


async def test_persistent_identity(tmp_path: Path) -> None:
    ident = await persistent_identity(AgentSection(work_dir=tmp_path), FakeNix())
    assert ident.name == default_name() == socket.gethostname()[:128]
    assert ident.hostname == socket.gethostname()
    assert ident.machine_id == load_machine_id(tmp_path)
    assert ident.ephemeral is False
    named = await persistent_identity(AgentSection(work_dir=tmp_path, name="b1"), FakeNix())
    assert named.name == "b1" and named.machine_id == ident.machine_id
