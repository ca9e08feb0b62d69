"""``bigtent up``'s pure parts and its state directory: the configs it renders load with
the real loaders, the keys and tokens it makes once are reused."""

from __future__ import annotations

import shlex
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from bigtent.config import Role, load_agent_config, load_runner_config
from bigtent.up import UpSettings
from bigtent.up.children import restart_delay_secs
from bigtent.up.state import (
    Layout,
    host_sandbox_paths,
    key_name,
    prepare_state,
    render_agent_config,
    render_env,
    render_runner_config,
)


def test_render_runner_config_loads(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "st ate")
    text = render_runner_config(layout, 8123)
    cfg = load_runner_config(_write(tmp_path / "r.toml", text))
    assert cfg.runner.listen == "127.0.0.1:8123"
    assert cfg.runner.allow_plaintext is True
    assert cfg.runner.state_dir == layout.root
    assert (
        cfg.database_url() == layout.database_url == f"sqlite+aiosqlite:///{layout.root}/bigtent.db"
    )
    assert cfg.signing_key_path() == layout.signing_key
    assert {(t.role, t.token_file) for t in cfg.auth.tokens} == {
        (r, layout.token_file(r)) for r in (Role.CLIENT, Role.AGENT, Role.ADMIN)
    }
    # The local client's builds are trusted (architecture §6): built by the local agents into the
    # main cache.
    assert {t.role for t in cfg.auth.tokens if t.trusted} == {Role.CLIENT}


def test_render_agent_config_loads(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    text = render_agent_config(layout, 2, "http://127.0.0.1:8123", 3, ["/bin=/usr/bin", "/usr"])
    cfg = load_agent_config(_write(tmp_path / "a.toml", text)).agent
    assert cfg.name == "local-2" and cfg.max_jobs == 3
    assert cfg.store == f"local?root={tmp_path}/agents/2/root"
    assert cfg.work_dir == tmp_path / "agents" / "2"
    assert cfg.token_file == layout.token_file(Role.AGENT)
    assert cfg.sandbox_paths == ["/bin=/usr/bin", "/usr"]
    assert "sandbox_paths" not in render_agent_config(layout, 1, "http://x:1", 1, [])


def test_render_env_is_shell_safe() -> None:
    text = render_env("http://127.0.0.1:8080", "bt_a'b", "bt_agent", "k-1:abc+/=")
    values = dict(
        shlex.split(line.removeprefix("export "))[0].split("=", 1)
        for line in text.splitlines()
        if line.startswith("export ")
    )
    assert values == {
        "BIGTENT_URL": "http://127.0.0.1:8080",
        "BIGTENT_TOKEN": "bt_a'b",
        "BIGTENT_AGENT_TOKEN": "bt_agent",
        "BIGTENT_CACHE_URL": "http://127.0.0.1:8080/cache",
        "BIGTENT_CACHE_PUBLIC_KEY": "k-1:abc+/=",
    }


def test_host_sandbox_paths_only_existing() -> None:
    present = {"/usr/bin", "/usr", "/usr/lib"}
    assert host_sandbox_paths(present.__contains__) == ["/bin=/usr/bin", "/usr", "/lib=/usr/lib"]
    assert host_sandbox_paths(lambda p: False) == []


@pytest.mark.parametrize(
    ("failures", "delay"), [(1, 1.0), (2, 2.0), (3, 4.0), (6, 30.0), (50, 30.0)]
)
def test_restart_delay(failures: int, delay: float) -> None:
    assert restart_delay_secs(failures) == delay


def test_key_name() -> None:
    assert key_name("box.example.org") == "bigtent-box-1"
    assert key_name("") == "bigtent-localhost-1"


def test_prepare_state_generates_once_then_reuses(tmp_path: Path) -> None:
    settings = UpSettings(state_dir=tmp_path / "st", agents=2, port=8111, jobs=3, host_tools=True)
    first = prepare_state(settings)
    layout = first.layout
    mode: Callable[[Path], int] = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(layout.signing_key) == 0o600
    for role in (Role.CLIENT, Role.AGENT, Role.ADMIN):
        assert mode(layout.token_file(role)) == 0o600
    assert mode(layout.tokens_dir) == 0o700
    assert layout.agent_config(2).exists() and not layout.agent_config(3).exists()
    key_text = layout.signing_key.read_text()
    second = prepare_state(UpSettings(state_dir=tmp_path / "st", agents=1, port=8222))
    assert second.tokens == first.tokens
    assert second.cache_public_key == first.cache_public_key
    assert layout.signing_key.read_text() == key_text
    assert "127.0.0.1:8222" in layout.runner_config.read_text()  # configs follow the flags
    assert load_runner_config(layout.runner_config).runner.port == 8222


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
