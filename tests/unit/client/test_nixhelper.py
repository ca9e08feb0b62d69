"""The hook's helper process, without a runner: one helper per socket, bad requests answered,
idle exit; and a hook relaying a helper's answer."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bigtent.client.hookcommon import HookConfig, LogSink
from bigtent.client.hookhandover import via_helper
from bigtent.client.nixhelper import Helper
from tests.conftest import eventually


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths end at 108 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="bt-") as d:
        yield Path(d)


def config(sock: Path, idle: float = 0.3) -> HookConfig:
    return HookConfig(runner_url="http://127.0.0.1:9", socket=str(sock), helper_idle_secs=idle)


async def test_one_helper_per_socket_and_it_exits_when_idle(sock_dir: Path) -> None:
    sock = sock_dir / "h.sock"
    first = asyncio.create_task(Helper(config(sock)).serve(str(sock)))
    await eventually(sock.exists, timeout=5, what="the helper to listen")
    assert os.stat(sock).st_mode & 0o077 == 0  # only its user may connect
    # A second helper for the same socket sees the lock and leaves at once.
    async with asyncio.timeout(2):
        assert await Helper(config(sock)).serve(str(sock)) == 0
    assert not first.done()
    async with asyncio.timeout(5):
        assert await first == 0  # idle for 0.3 s: gone, socket removed
    assert not sock.exists()


async def test_bad_request_is_answered_not_fatal(sock_dir: Path) -> None:
    sock = sock_dir / "h.sock"
    serving = asyncio.create_task(Helper(config(sock, idle=1)).serve(str(sock)))
    await eventually(sock.exists, timeout=5, what="the helper to listen")
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(b'{"drv": "/etc/passwd", "wanted": [], "store": ""}\n')
        await writer.drain()
        replies = (await reader.read()).decode().splitlines()
        writer.close()
    assert replies[0].startswith("error bad request")
    assert replies[-1] == "exit 1"
    assert not serving.done()  # still serving
    async with asyncio.timeout(5):
        assert await serving == 0


def test_hook_relays_the_helpers_log_errors_and_status(sock_dir: Path) -> None:
    """``via_helper`` against a stand-in helper on the socket: what it says reaches Nix."""
    sock = sock_dir / "h.sock"
    seen: list[bytes] = []
    ready = threading.Event()

    def stand_in() -> None:
        import socket

        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(sock))
            server.listen()
            ready.set()
            conn, _ = server.accept()
            with conn, conn.makefile("rwb") as f:
                seen.append(f.readline())
                f.write(b"log building node 0-0\nerror oops\nexit 100\n")
                f.flush()

    thread = threading.Thread(target=stand_in, daemon=True)
    thread.start()
    assert ready.wait(5)
    log, messages = io.BytesIO(), io.BytesIO()
    drv = "/nix/store/czqhcspln0q6jcivma6n3kwn2zbyccsn-a.drv"
    status = via_helper(config(sock), "local?root=/tmp/c", drv, ["out"], LogSink(log, messages))
    thread.join(5)
    assert status == 100
    assert json.loads(seen[0]) == {"drv": drv, "wanted": ["out"], "store": "local?root=/tmp/c"}
    assert log.getvalue() == b"building node 0-0\nbigtent: oops\n"
    assert b'"bigtent: oops"' in messages.getvalue()


async def test_a_hook_that_goes_away_stops_the_following(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nix interrupted: the hook's connection closes and the helper stops following the
    derivation (it does not poll the runner for a build nobody waits for)."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever(*args: object) -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    monkeypatch.setattr("bigtent.client.nixhelper.build_on_farm", forever)
    sock = sock_dir / "h.sock"
    helper = Helper(config(sock, idle=0.3)._replace(token="t"))
    serving = asyncio.create_task(helper.serve(str(sock)))
    await eventually(sock.exists, timeout=5, what="the helper to listen")
    async with asyncio.timeout(10):
        _, writer = await asyncio.open_unix_connection(str(sock))
        drv = "/nix/store/czqhcspln0q6jcivma6n3kwn2zbyccsn-a.drv"
        writer.write(json.dumps({"drv": drv, "wanted": [], "store": ""}).encode() + b"\n")
        await writer.drain()
        await started.wait()
        writer.close()
        await cancelled.wait()
        assert await serving == 0  # and it idles out afterwards
    assert helper.active == 0
