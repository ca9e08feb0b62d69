"""Until ephemeral agents exist, asking for one is refused instead of silently ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from bigtent.agent.session import run_agent
from bigtent.config import load_agent_config
from bigtent.errors import ConfigError


async def test_ephemeral_config_is_refused(tmp_path: Path) -> None:
    cfg = load_agent_config(None, agent={"work_dir": str(tmp_path), "ephemeral": {"max_builds": 1}})
    with pytest.raises(ConfigError, match="ephemeral agents"):
        await run_agent(cfg, None, install_signal_handlers=False)
