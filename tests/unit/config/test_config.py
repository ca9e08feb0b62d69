"""Runner configuration rules that need no network: architecture §6 transport security."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bigtent.config import load_runner_config
from bigtent.errors import ConfigError

TOKEN = {"name": "t", "role": "agent", "sha256": "0" * 64}
TLS = {"cert_file": "/etc/x.crt", "key_file": "/etc/x.key"}


@pytest.mark.parametrize(
    ("runner", "tokens", "problem"),
    [
        ({"listen": "127.0.0.1:1"}, [], None),
        ({"listen": "0.0.0.0:1"}, [], None),
        ({"listen": "127.0.0.1:1"}, [TOKEN], "TLS is not"),
        ({"listen": "127.0.0.1:1", "allow_plaintext": True}, [TOKEN], None),
        ({"listen": "[::1]:1", "allow_plaintext": True}, [TOKEN], None),
        ({"listen": "localhost:1", "allow_plaintext": True}, [TOKEN], None),
        ({"listen": "0.0.0.0:1", "allow_plaintext": True}, [TOKEN], "only honoured on a loopback"),
        ({"listen": "10.1.2.3:1", "allow_plaintext": True}, [TOKEN], "only honoured on a loopback"),
        ({"listen": "0.0.0.0:1", "tls": TLS}, [TOKEN], None),
        ({"listen": "0.0.0.0:1", "tls": {**TLS, "pin_client_name": True}}, [], "needs runner.tls"),
        (
            {"listen": "0.0.0.0:1", "tls": {**TLS, "pin_client_name": True, "client_ca": "ca"}},
            [],
            None,
        ),
    ],
)
def test_plaintext_with_tokens_is_refused_off_loopback(
    runner: dict[str, Any], tokens: list[dict[str, str]], problem: str | None, tmp_path: Path
) -> None:
    cfg = load_runner_config(
        None, runner={"state_dir": str(tmp_path), **runner}, auth={"tokens": tokens}
    )
    if problem is None:
        cfg.check_transport_security()
    else:
        with pytest.raises(ConfigError, match=problem):
            cfg.check_transport_security()


def test_agent_max_jobs_is_bounded_by_the_protocol() -> None:
    from bigtent.config import load_agent_config

    with pytest.raises(ConfigError, match="max_jobs"):
        load_agent_config(None, agent={"max_jobs": 100_000})
