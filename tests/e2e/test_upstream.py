"""Upstream caches: outputs an upstream already has get no step, and agents substitute them."""

from __future__ import annotations

import functools
import http.server
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bigtent.nix.keys import generate_key
from tests.conftest import HOST_TOOLS_OPTION
from tests.e2e.conftest import Farm, write_dag_file

pytestmark = [pytest.mark.e2e, pytest.mark.nix]

NIX = ["--option", "substituters", ""]


@pytest.fixture
def static_server() -> Iterator[Callable[[Path], str]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(root: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def _nix(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_outputs_in_an_upstream_cache_are_not_built(
    farm_factory: Callable[..., Farm],
    static_server: Callable[[Path], str],
    tmp_path: Path,
) -> None:
    # An upstream binary cache (a directory served over HTTP, signed with its own key) holding
    # the outputs of the DAG's bottom layer, built here with plain Nix.
    key = generate_key("upstream-test-1")
    (tmp_path / "up.sk").write_text(key.to_text())
    cache_dir = tmp_path / "upstream"
    dag = write_dag_file(tmp_path, layers=2, width=2)
    bottom = [
        _nix(
            "nix-build",
            str(dag),
            "-A",
            f"nodes.dag-0-{i}",
            "--no-out-link",
            *NIX,
            *HOST_TOOLS_OPTION,
        )
        for i in range(2)
    ]
    _nix(
        "nix",
        "--extra-experimental-features",
        "nix-command",
        "copy",
        *NIX,
        "--to",
        f"file://{cache_dir}?compression=none&secret-key={tmp_path / 'up.sk'}",
        *bottom,
    )
    url = static_server(cache_dir)
    farm = farm_factory(
        agents=1,
        runner_extra=f'\n[[cache.upstreams]]\nurl = "{url}"\npublic_key = '
        f'"{key.public_key().to_text()}"\n',
    )
    code, out = farm.build_json(str(dag), "-A", "top", "--no-download")
    assert code == 0, out
    with farm.api() as c:
        steps = c.get(f"/api/v1/builds/{out['build_id']}/steps").json()["steps"]
        names = sorted(s["name"] for s in steps)
        assert names == ["dag-1-0", "dag-1-1", "dag-top-0"]
        # The runner found the references into the upstream's paths by scanning.
        top = next(s for s in steps if s["name"] == "dag-1-0")["outputs"]["out"]
        narinfo = c.get(f"/cache/{Path(top).name[:32]}.narinfo").text
    refs = next(line for line in narinfo.splitlines() if line.startswith("References:"))
    assert any(Path(b).name in refs for b in bottom), narinfo
    # A fresh store gets everything: ours from the runner, the bottom layer from upstream.
    fresh = tmp_path / "fresh"
    proc = subprocess.run(
        [
            "nix-store",
            "--store",
            f"local?root={fresh}",
            "--realise",
            top,
            "--option",
            "substituters",
            f"{farm.cache_url} {url}",
            "--option",
            "trusted-public-keys",
            f"{farm.public_key} {key.public_key().to_text()}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path / "xdg")},
    )
    assert proc.returncode == 0, proc.stderr
    for path in bottom:
        assert (fresh / path.lstrip("/")).exists()
