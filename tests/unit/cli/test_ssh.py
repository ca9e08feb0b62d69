"""``bigtent ssh import`` and ``bigtent ssh check`` through the real entry point in CliRunner."""

from __future__ import annotations

import base64
import json
import socket
import struct
import tomllib
from pathlib import Path

import pytest

from bigtent.config import RunnerConfig
from tests.unit.cli.helpers import run_cli

run = run_cli


def _key() -> str:
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + b"\x02" * 32
    return "ssh-ed25519 " + base64.b64encode(blob).decode()


KEY = _key()


def _machines(tmp_path: Path) -> Path:
    b64 = base64.b64encode(f"{KEY} root@b1\n".encode()).decode()
    path = tmp_path / "machines"
    path.write_text(
        "# builders\n"
        f"ssh://nix@b1:2222 x86_64-linux,i686-linux /etc/k 4 2 kvm - {b64}\n"
        "b2 aarch64-linux\n"
    )
    return path


def test_import_prints_toml(tmp_path: Path) -> None:
    result = run(["ssh", "import", str(_machines(tmp_path))])
    assert result.exit_code == 0, result.output
    cfg = RunnerConfig(**tomllib.loads(result.stdout))
    b1, b2 = cfg.ssh_builders
    assert (b1.uri, b1.systems, b1.max_jobs, b1.speed_factor, b1.host_key) == (
        "ssh://nix@b1:2222",
        ["x86_64-linux", "i686-linux"],
        4,
        2.0,
        KEY,
    )
    assert b2.uri == "ssh://b2" and b2.host_key is None
    assert result.stdout.count("[[ssh_builders]]") == 2
    assert "No host key for b2" in result.stderr


def test_import_json(tmp_path: Path) -> None:
    result = run(["ssh", "import", "--json", str(_machines(tmp_path))])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [d["uri"] for d in data] == ["ssh://nix@b1:2222", "ssh://b2"]
    assert data[0]["host_key"] == KEY and data[0]["enabled"] is True


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("ok x86_64-linux\nbad\n", "line 2: no systems"),
        ("ssh-ng://h x86_64-linux\n", "line 1"),
    ],
)
def test_import_bad_file(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "machines"
    path.write_text(content)
    result = run(["ssh", "import", str(path)])
    assert result.exit_code == 2
    assert "Error: machines file" in result.stderr and match.split(":")[0] in result.stderr
    assert "Traceback" not in result.output


def test_import_missing_file(tmp_path: Path) -> None:
    result = run(["ssh", "import", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "cannot read" in result.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _config(tmp_path: Path, body: str, *, require: bool = True) -> Path:
    path = tmp_path / "runner.toml"
    path.write_text(f"ssh_require_host_key = {str(require).lower()}\n{body}")
    return path


def test_check_unreachable_host_is_a_clean_error(tmp_path: Path) -> None:
    port = _closed_port()
    cfg = _config(
        tmp_path,
        f'[[ssh_builders]]\nuri = "ssh://root@127.0.0.1:{port}"\nsystems = ["x86_64-linux"]\n'
        f'host_key = "{KEY}"\n',
    )
    result = run(
        [
            "ssh",
            "check",
            f"root@127.0.0.1:{port}",
            "--config",
            str(cfg),
            "--connect-timeout-secs",
            "2",
        ]
    )
    assert result.exit_code != 0
    assert result.stderr.startswith("Error: ")
    assert "root@127.0.0.1" in result.stderr
    assert "Traceback" not in result.output


def test_check_unpinned_builder_refused(tmp_path: Path) -> None:
    cfg = _config(tmp_path, '[[ssh_builders]]\nuri = "ssh://b"\nsystems = ["x"]\n')
    result = run(["ssh", "check", "b", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "no host_key" in result.stderr and "Traceback" not in result.output


def test_check_unknown_name(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "")
    result = run(["ssh", "check", "nope", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "no SSH builder named 'nope'" in result.stderr


def test_check_needs_config() -> None:
    result = run(["ssh", "check", "b"])
    assert result.exit_code == 2 and "--config" in result.output
