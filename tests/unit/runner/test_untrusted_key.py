"""The untrusted cache's signing key: beside the main key, generated once when missing."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from bigtent.config import load_runner_config
from bigtent.errors import ConfigError
from bigtent.nix.keys import generate_key, load_secret_key
from bigtent.runner.components import load_untrusted_key


def test_generated_beside_the_main_key_once(tmp_path: Path) -> None:
    main = generate_key("cache.example.org-1")
    cfg = load_runner_config(None, cache={"signing_key_file": str(tmp_path / "cache.sk")})
    assert cfg.untrusted_signing_key_path() == tmp_path / "cache-untrusted.sk"
    key = load_untrusted_key(cfg, main)
    assert key.name == "cache.example.org-1-untrusted"
    path = tmp_path / "cache-untrusted.sk"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret_key(path) == key
    assert load_untrusted_key(cfg, main) == key  # kept, not replaced


def test_a_configured_key_must_exist(tmp_path: Path) -> None:
    cfg = load_runner_config(
        None, cache={"untrusted_signing_key_file": str(tmp_path / "missing.sk")}
    )
    with pytest.raises(ConfigError, match="does not exist"):
        load_untrusted_key(cfg, generate_key("main-1"))
    assert not (tmp_path / "missing.sk").exists()


def test_the_main_key_cannot_double_as_the_untrusted_one(tmp_path: Path) -> None:
    main = generate_key("main-1")
    (tmp_path / "main.sk").write_text(main.to_text())
    cfg = load_runner_config(
        None,
        cache={
            "signing_key_file": str(tmp_path / "main.sk"),
            "untrusted_signing_key_file": str(tmp_path / "main.sk"),
        },
    )
    with pytest.raises(ConfigError, match="main key's name"):
        load_untrusted_key(cfg, main)
