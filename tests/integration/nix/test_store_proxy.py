"""``bigtent nix-proxy`` relaying a real Nix 2.8 client to a real ``nix-daemon --stdio``: what
is not a build passes through untouched (the relay parses every op Nix sent), and a build
with no runner there fails fast, with the reason, on Nix's side."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nixproxy import nix_via, running_proxy

pytestmark = [pytest.mark.nix]

NOWHERE = "http://127.0.0.1:9"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BIGTENT_", "NIX_"))}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), NIX_CONFIG="substituters =\n")
    return env


@pytest.fixture
def proxy(tmp_path: Path, env: dict[str, str]) -> Iterator[str]:
    with running_proxy(NOWHERE, tmp_path / "store", env) as uri:
        yield uri


def test_store_ops_pass_through(proxy: str, env: dict[str, str], tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "big").write_bytes(os.urandom(300_000))  # several frames of 64 KiB
    (tree / "small").write_text("hello\n")
    added = nix_via(proxy, env, "--add", str(tree), tool="nix-store")
    assert added.returncode == 0, added.stderr
    path = added.stdout.strip()
    store = tmp_path / "store"
    assert (store / path.lstrip("/") / "sub" / "big").read_bytes() == (
        tree / "sub" / "big"
    ).read_bytes()
    # An opaque path to "build" is not a derivation: relayed, the runner never asked.
    realised = nix_via(proxy, env, "--realise", path, tool="nix-store")
    assert realised.returncode == 0, realised.stderr
    info = nix_via(proxy, env, "path-info", "--json", path, tool="nix")
    assert info.returncode == 0 and path in info.stdout, info.stderr
    # Another store copies into the proxy's (AddMultipleToStore / AddToStoreNar, framed).
    other = tmp_path / "other"
    src = subprocess.run(
        ["nix-store", "--store", f"local?root={other}", "--add", str(tree / "small")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    copied = subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "copy", "--no-check-sigs",
         "--from", f"local?root={other}", "--to", proxy, src],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert copied.returncode == 0, copied.stderr
    assert (store / src.lstrip("/")).read_text() == "hello\n"


def test_a_build_without_a_runner_fails_fast(
    proxy: str, env: dict[str, str], tmp_path: Path
) -> None:
    expr = tmp_path / "t.nix"
    expr.write_text(
        'derivation { name = "t"; system = builtins.currentSystem; builder = "/bin/sh";'
        ' args = ["-c" "echo hi > $out"]; }'
    )
    drv = nix_via(proxy, env, str(expr), tool="nix-instantiate")
    assert drv.returncode == 0, drv.stderr
    assert drv.stdout.strip().endswith("-t.drv")
    started = time.monotonic()
    built = nix_via(proxy, env, str(expr), "--no-out-link", timeout=60)
    assert built.returncode != 0
    assert time.monotonic() - started < 20
    assert "cannot reach runner at http://127.0.0.1:9" in built.stderr, built.stderr
    # The connection is still in step: the same command fails the same way, not with a
    # protocol error.
    again = nix_via(proxy, env, "build", "-f", str(expr), "--no-link", tool="nix", timeout=60)
    assert "cannot reach runner" in again.stderr, again.stderr
