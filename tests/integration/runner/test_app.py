"""Serving the runner: with port 0 the URLs it hands out name the port actually bound."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from bigtent.config import load_runner_config
from bigtent.errors import ConfigError
from bigtent.runner.http.app import bind
from tests.integration.runner.conftest import MakeRunner


def test_bind_port_zero_names_the_bound_port(tmp_path: Path) -> None:
    config = load_runner_config(None, runner={"state_dir": str(tmp_path), "listen": "127.0.0.1:0"})
    sock, bound = bind(config)
    with sock:
        port = sock.getsockname()[1]
        assert port != 0
        assert bound.runner.port == port
        assert bound.runner.base_url() == f"http://127.0.0.1:{port}"
        assert bound.runner.state_dir == config.runner.state_dir
        # The port is taken: a second runner on it is a configuration error, not a crash.
        with pytest.raises(ConfigError, match=r"runner\.listen"):
            bind(bound)


async def test_cache_url_is_the_served_one(make_runner: MakeRunner) -> None:
    runner = await make_runner(serve=True)
    assert runner.url is not None
    async with httpx.AsyncClient() as client:
        info = await client.get(f"{runner.url}/cache/nix-cache-info")
    assert info.status_code == 200
    assert runner.comps.cache.url == f"{runner.url}/cache"
