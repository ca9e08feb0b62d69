"""The ``[forge]`` section: defaults, overrides, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from bigtent.config import load_runner_config
from bigtent.errors import ConfigError


def test_defaults_and_overrides(tmp_path: Path) -> None:
    cfg = load_runner_config(None, runner={"state_dir": str(tmp_path)})
    assert cfg.forge.max_job_checks == 47
    assert cfg.forge.min_update_interval_secs == 10.0
    cfg = load_runner_config(
        None, runner={"state_dir": str(tmp_path)}, forge={"max_job_checks": 5, "keep_secs": 60}
    )
    assert (cfg.forge.max_job_checks, cfg.forge.keep_secs) == (5, 60.0)


@pytest.mark.parametrize(
    "forge",
    [{"max_job_checks": -1}, {"log_tail_chars": 100_000}, {"retry_base_secs": 0}, {"nope": 1}],
)
def test_invalid_values_are_refused(tmp_path: Path, forge: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="forge"):
        load_runner_config(None, runner={"state_dir": str(tmp_path)}, forge=forge)
