"""Agent identities: the persistent machine id file, default name, systems; ephemeral names."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from bigtent.agent.identity import (
    MACHINE_ID_FILE,
    MAX_EPHEMERAL_NAME_BYTES,
    default_name,
    ephemeral_identity,
    ephemeral_name,
    load_machine_id,
    persistent_identity,
    resolve_systems,
)
from bigtent.config import AgentSection
from bigtent.errors import ConfigError
from bigtent.nix.store import NixStore
from bigtent.protocol import MachineId


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


# ---- ephemeral identities -----------------------------------------------------------------
MID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("base", "env", "name"),
    [
        ("ci", {}, "ci-01234567"),
        ("ci", {"GITHUB_RUN_ID": "987654321"}, "ci-gh987654321-01234567"),
        (
            "ci",
            {"GITHUB_RUN_ID": "987654321", "GITHUB_RUN_ATTEMPT": "2"},
            "ci-gh987654321.2-01234567",
        ),
        # An attempt without a run id says nothing.
        ("ci", {"GITHUB_RUN_ATTEMPT": "2"}, "ci-01234567"),
        # Values that are not plain numbers are ignored, so the suffix stays short.
        ("ci", {"GITHUB_RUN_ID": "12; rm -rf"}, "ci-01234567"),
        ("ci", {"GITHUB_RUN_ID": "1" * 21}, "ci-01234567"),
        ("ci", {"GITHUB_RUN_ID": "", "GITHUB_RUN_ATTEMPT": "1"}, "ci-01234567"),
        ("ci", {"GITHUB_RUN_ID": "5", "GITHUB_RUN_ATTEMPT": "x"}, "ci-gh5-01234567"),
        ("ci", {"GITHUB_RUN_ID": "٣"}, "ci-01234567"),  # a non-ASCII digit
        # Fits exactly: 119 + 9 bytes.
        ("a" * 119, {}, "a" * 119 + "-01234567"),
        # Too long: the base is cut, the suffix kept.
        ("a" * 300, {}, "a" * 119 + "-01234567"),
        (
            "b" * 300,
            {"GITHUB_RUN_ID": "12345678901", "GITHUB_RUN_ATTEMPT": "3"},
            "b" * (128 - len("-gh12345678901.3-01234567")) + "-gh12345678901.3-01234567",
        ),
        # Multi-byte: "é" is 2 bytes; 60 of them are 120 bytes, room is 119, so the 60th
        # (cut in the middle) goes whole.
        ("é" * 60, {}, "é" * 59 + "-01234567"),
        # 3-byte characters: 119 // 3 = 39 fit.
        ("日本" * 30, {}, ("日本" * 30)[:39] + "-01234567"),
        # A 4-byte emoji straddling the cut after 118 ASCII bytes goes whole.
        ("a" * 118 + "🚀" + "z", {}, "a" * 118 + "-01234567"),
    ],
)
def test_ephemeral_name(base: str, env: dict[str, str], name: str) -> None:
    got = ephemeral_name(base, MID, env)
    assert got == name
    assert len(got.encode()) <= MAX_EPHEMERAL_NAME_BYTES == 128


def test_ephemeral_name_uses_the_hex_of_a_dashed_uuid() -> None:
    assert ephemeral_name("x", "ABCDEF12-3456-7890-abcd-ef0123456789", {}) == "x-abcdef12"


async def test_ephemeral_identity_is_fresh_and_never_on_disk(tmp_path: Path) -> None:
    section = AgentSection(work_dir=tmp_path / "work", name="gha", systems=["x86_64-linux"])
    env = {"GITHUB_RUN_ID": "42", "GITHUB_RUN_ATTEMPT": "1"}
    first = await ephemeral_identity(section, FakeNix(), env=env)
    second = await ephemeral_identity(section, FakeNix(), env=env)
    assert first.ephemeral and second.ephemeral
    assert first.machine_id != second.machine_id
    assert len(first.machine_id) == 32 and int(first.machine_id, 16) >= 0
    assert first.name == f"gha-gh42.1-{first.machine_id[:8]}"
    assert first.systems == ("x86_64-linux",)
    assert not (tmp_path / "work").exists()
    assert list(tmp_path.iterdir()) == []


async def test_ephemeral_identity_defaults_to_the_host_name(tmp_path: Path) -> None:
    ident = await ephemeral_identity(
        AgentSection(work_dir=tmp_path), FakeNix(), env={}, new_id=lambda: MachineId(MID)
    )
    assert ident.name == ephemeral_name(default_name(), MID, {})
    assert ident.machine_id == MID
    assert ident.systems == ("aarch64-linux",)


async def test_identities_carry_the_configured_launch_id(tmp_path: Path) -> None:
    section = AgentSection(work_dir=tmp_path, launch_id="gha-x86-0007")
    assert (await ephemeral_identity(section, FakeNix(), env={})).launch_id == "gha-x86-0007"
    assert (await persistent_identity(section, FakeNix())).launch_id == "gha-x86-0007"
    plain = await ephemeral_identity(AgentSection(work_dir=tmp_path), FakeNix(), env={})
    assert plain.launch_id is None
