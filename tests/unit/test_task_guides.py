"""The task guides (docs/production.md, docs/agents.md, docs/cache-clients.md): their config
files load with the real loaders, their commands and links name things that exist, and the
stale text they replaced is gone."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from bigtent.cli import cli
from bigtent.config import load_agent_config, load_runner_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
TOML_BLOCK = re.compile(r"^( *)```toml\n(.*?)^\1```", re.S | re.M)
INI_BLOCK = re.compile(r"^( *)```ini\n(.*?)^\1```", re.S | re.M)
LINK = re.compile(r"\]\(([a-z0-9_-]+\.md)(?:#([a-z0-9-]+))?\)")


def _toml_blocks(name: str) -> list[str]:
    text = (DOCS / name).read_text()
    return [
        "\n".join(line.removeprefix(indent) for line in body.splitlines())
        for indent, body in TOML_BLOCK.findall(text)
    ]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_the_production_runner_config_loads(tmp_path: Path) -> None:
    [runner_toml] = _toml_blocks("production.md")
    digest = "0" * 64
    path = tmp_path / "runner.toml"
    path.write_text(runner_toml.replace('sha256 = "…"', f'sha256 = "{digest}"'))
    cfg = load_runner_config(path)
    assert cfg.runner.base_url() == "https://ci.example.org"
    assert cfg.runner.tls is not None
    assert cfg.runner.host == "0.0.0.0" and cfg.runner.port == 443


def test_the_second_machines_agent_config_loads(tmp_path: Path) -> None:
    blocks = [b for b in _toml_blocks("agents.md") if 'name = "builder2"' in b]
    assert len(blocks) == 1
    path = tmp_path / "agent.toml"
    path.write_text(blocks[0])
    cfg = load_agent_config(path)
    assert (cfg.agent.runner_url, cfg.agent.max_jobs) == ("https://ci.example.org", 4)
    assert cfg.agent.token_file == Path("/etc/bigtent/agent.token")


@pytest.mark.parametrize(
    "command",
    [
        "keys generate",
        "token create",
        "token revoke",
        "db migrate",
        "db status",
        "cache verify",
        "agents drain",
        "runner",
        "agent",
        "status",
    ],
)
def test_the_guides_commands_exist(command: str) -> None:
    group: click.Command = cli
    for word in command.split():
        assert isinstance(group, click.Group)
        found = group.get_command(click.Context(group), word)
        assert found is not None, f"bigtent {command}: no {word!r}"
        group = found


@pytest.mark.parametrize("name", ["production.md", "cache-clients.md", "agents.md"])
def test_the_guides_links_resolve(name: str) -> None:
    for target, anchor in LINK.findall((DOCS / name).read_text()):
        page = DOCS / target
        assert page.is_file(), f"{name} links {target}, which does not exist"
        if anchor:
            assert anchor in _anchors(page.read_text()), f"{name}: no #{anchor} in {target}"


def test_the_cache_guide_names_what_a_daemons_users_need() -> None:
    text = (DOCS / "cache-clients.md").read_text()
    for setting in (
        "extra-substituters",
        "extra-trusted-public-keys",
        "extra-trusted-substituters",
        "trusted-users",
    ):
        assert f"{setting} = " in text, setting


def test_stale_text_is_gone() -> None:
    assert "not wired yet" not in (DOCS / "oidc.md").read_text()
    autoscaling = (DOCS / "autoscaling.md").read_text()
    assert "do not record their repository" not in autoscaling
    assert "pool_scope" not in autoscaling


@pytest.mark.parametrize(
    ("name", "unit"),
    [("production.md", "bigtent-runner.service"), ("agents.md", "bigtent-agent.service")],
)
def test_the_systemd_units_parse(name: str, unit: str, tmp_path: Path) -> None:
    """systemd's own parser finds nothing to say about the guides' units (unknown keys, bad
    values); the bigtent they start is this one."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    [(indent, body)] = INI_BLOCK.findall((DOCS / name).read_text())
    text = "\n".join(line.removeprefix(indent) for line in body.splitlines())
    assert f"# /etc/systemd/system/{unit}" in text
    bigtent = str(Path(sys.executable).with_name("bigtent"))
    (tmp_path / unit).write_text(text.replace("/opt/bigtent/bin/bigtent", bigtent))
    out = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    complaints = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if unit in line or "Unknown" in line or "Failed" in line
    ]
    assert complaints == [], complaints
