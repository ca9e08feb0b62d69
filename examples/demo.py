"""`make demo`: start a local farm with `bigtent up`, build examples/dag.nix on it, stop it.

Everything lives in ./.bigtent-demo (keys, tokens, database, cache, agent stores), so a second
run reuses the farm's cache and builds nothing.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STATE = Path.cwd() / ".bigtent-demo"
PORT = os.environ.get("BIGTENT_DEMO_PORT", "8080")


def read_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export ") :]
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = shlex.split(value)[0] if value else ""
    return env


def main() -> int:
    env_file = STATE / "env"
    env_file.unlink(missing_ok=True)
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bigtent",
            "up",
            "--agents",
            "2",
            "--state-dir",
            str(STATE),
            "--port",
            PORT,
            "--host-tools",
        ],
    )
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists():
            if up.poll() is not None:
                print("demo: bigtent up exited early", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print("demo: the farm did not come up within 60 s", file=sys.stderr)
                return 1
            time.sleep(0.2)
        env = {**os.environ, **read_env(env_file), "NIX_CONFIG": "substituters =\n"}
        print("\ndemo: building examples/dag.nix (101 derivations) on the local farm\n", flush=True)
        build = subprocess.run(
            [
                sys.executable,
                "-m",
                "bigtent",
                "build",
                str(HERE / "dag.nix"),
                "-A",
                "top",
                "--out-link",
                str(STATE / "result"),
            ],
            env=env,
        )
        if build.returncode == 0:
            result = (STATE / "result").resolve()
            print(f"\ndemo: built {result}")
            print(f"demo: it says: {(STATE / 'result').read_text()[:60].strip()} ...")
            subprocess.run([sys.executable, "-m", "bigtent", "agents"], env=env)
        return build.returncode
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()


if __name__ == "__main__":
    sys.exit(main())
