"""``bigtent nix-proxy`` relaying a real Nix 2.8 client to a real ``nix-daemon --stdio``: what
is not a build passes through untouched (the relay parses every op Nix sent), and a build
with no runner there fails fast, with the reason, on Nix's side."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from bigtent.client.storeproxy import ProxyConfig
from tests.nixproxy import nix_via, running_proxy

if TYPE_CHECKING:
    from bigtent.client.api import RunnerClient

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


FAKE_DAEMON = """\
import struct, sys
inp, out = sys.stdin.buffer, sys.stdout.buffer
def u64():
    data = inp.read(8)
    if len(data) < 8:
        sys.exit(0)
    return struct.unpack("<Q", data)[0]
record = open(sys.argv[1], "a")
assert u64() == 0x6E697863
out.write(struct.pack("<QQ", 0x6478696F, 0x126)); out.flush()
record.write(f"client {u64():#x}\\n"); record.flush()
u64(); u64()  # affinity 0, reserve-space
out.write(struct.pack("<Q", 0x616C7473)); out.flush()
while chunk := inp.read1(65536):
    record.write(chunk.hex()); record.flush()
"""


async def _talk(config: ProxyConfig, client_version: int, ops: list[bytes]) -> tuple[int, bytes]:
    """Connect to a proxy as a client of ``client_version``, send ``ops`` and close the
    sending side; the daemon's version as the proxy told it, and what came back until the
    proxy closed."""
    import asyncio

    from bigtent.client.storeproxy import serve
    from bigtent.nix import daemonwire as wire

    ready = asyncio.Event()
    server = asyncio.create_task(serve(config, ready))
    try:
        await ready.wait()
        reader, writer = await asyncio.open_unix_connection(config.socket)
        writer.write(wire.u64(wire.WORKER_MAGIC_1))
        hello = await reader.readexactly(16)
        writer.write(wire.u64(client_version) + wire.u64(0) + wire.u64(0))
        assert wire.Reader(await reader.readexactly(8)).u64() == wire.Stderr.LAST
        for op in ops:
            writer.write(op)
        writer.write_eof()
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        return wire.read_daemon_hello(hello), rest
    finally:
        server.cancel()


def fake_daemon(tmp_path: Path) -> tuple[ProxyConfig, Path]:
    """A proxy's config with a fake 1.38 daemon behind it, and the file where that daemon
    writes the client's version and the bytes of the ops it got."""
    import sys

    record = tmp_path / "daemon.txt"
    script = tmp_path / "fake-daemon"

    script.write_text(
        f"#!{sys.executable}\n" + FAKE_DAEMON.replace("sys.argv[1]", repr(str(record)))
    )
    script.chmod(0o755)

    def no_client() -> RunnerClient:
        raise AssertionError("no build: the runner is never asked")

    config = ProxyConfig(
        runner_url=NOWHERE, connect=no_client, socket=str(tmp_path / "s"), nix_daemon=str(script)
    )
    return config, record


def test_versions_are_lowered_and_an_unknown_op_closes(tmp_path: Path) -> None:
    import asyncio

    from bigtent.nix import daemonwire as wire

    config, record = fake_daemon(tmp_path)
    valid = wire.request(wire.Op.IS_VALID_PATH, [b"/nix/store/a-x"], 37)
    unknown = wire.u64(99) + wire.u64(0)
    told, rest = asyncio.run(_talk(config, (1 << 8) | 38, [valid, unknown]))
    # A 1.38 daemon is told to the client as 1.37, and a 1.38 client to the daemon as 1.37:
    # both parse at 1.37. The known op reached the daemon, the unknown one closed the
    # connection before it could.
    assert told == (1 << 8) | 37
    assert rest == b""
    assert record.read_text().splitlines() == ["client 0x125", valid.hex()]


def test_a_client_that_leaves_during_a_build_stops_its_following(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from bigtent.client import storeproxy
    from bigtent.nix import daemonwire as wire

    config, record = fake_daemon(tmp_path)
    ended: list[str] = []

    async def wanted(self: storeproxy.Farm, drvs: list[str]) -> list[str]:
        return drvs

    async def build(self: storeproxy.Farm, drvs: list[str], sink: storeproxy.ClientSink) -> None:
        try:
            await asyncio.Event().wait()  # a farm build that does not end
        finally:
            ended.append(drvs[0])

    monkeypatch.setattr(storeproxy.Farm, "wanted", wanted)
    monkeypatch.setattr(storeproxy.Farm, "build", build)
    op = wire.request(wire.Op.BUILD_PATHS, [[b"/nix/store/a-x.drv!out"], 0], 37)
    told, rest = asyncio.run(_talk(config, (1 << 8) | 37, [op]))
    # Following stopped when the client left; the build op never reached the daemon.
    assert (told, rest) == ((1 << 8) | 37, b"")
    assert ended == ["/nix/store/a-x.drv"]
    assert record.read_text().splitlines() == ["client 0x125"]
