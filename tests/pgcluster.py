"""A throwaway PostgreSQL cluster for the tests (NIX-TESTING: initdb refuses to run as root, so
as root the cluster belongs to the ``postgres`` user and runs through ``runuser``).

One cluster per pytest worker; every test gets its own database, copied from a migrated
template (``CREATE DATABASE ... TEMPLATE``), and dropped afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

_SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "32MB",
}
START_TIMEOUT_SECS = 30.0


def find_bin_dir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: on PATH, or Debian's versioned directory
    (the newest installed)."""
    on_path = shutil.which("initdb")
    if on_path is not None and shutil.which("pg_ctl") is not None:
        return Path(on_path).resolve().parent
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """initdb + pg_ctl on a temporary directory, TCP on loopback only, trust authentication
    for the ``postgres`` superuser. ``stop`` removes everything."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="bigtent-pg-"))
        self.data = self.root / "data"
        self.port = 0
        self._as_root = os.geteuid() == 0

    def _cmd(self, *argv: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if self._as_root else list(argv)

    def _run(self, *argv: str, timeout: float = 60) -> str:
        proc = subprocess.run(
            self._cmd(*argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc.stdout

    def start(self) -> None:
        if self._as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run(
            str(self.bin_dir / "initdb"),
            "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync",
            "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        options = " ".join(f"-c {k}={v!r}" if v == "" else f"-c {k}={v}" for k, v in
                           _SERVER_SETTINGS.items())  # fmt: skip
        for _attempt in range(5):
            self.port = _free_port()
            try:
                self._run(
                    str(self.bin_dir / "pg_ctl"),
                    "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                    "-t", str(int(START_TIMEOUT_SECS)), "-o", f"-p {self.port} {options}",
                    "start",
                )  # fmt: skip
                return
            except RuntimeError:
                # Another process took the port between the probe and the start: try again.
                if "could not bind" not in self.server_log():
                    raise
        raise RuntimeError("PostgreSQL did not start:\n" + self.server_log())

    def halt(self) -> None:
        """Stop the server, keeping its data (a database outage; ``resume`` ends it)."""
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start the halted server again on the same port."""
        options = " ".join(f"-c {k}={v!r}" if v == "" else f"-c {k}={v}" for k, v in
                           _SERVER_SETTINGS.items())  # fmt: skip
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
            "-t", str(int(START_TIMEOUT_SECS)), "-o", f"-p {self.port} {options}", "start",
        )  # fmt: skip

    def server_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "server.log").read_text()[-4000:]
        return ""

    def stop(self) -> None:
        if self.data.exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run(
                    str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                    "-w", "stop",
                )  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str, driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{dbname}"

    def sql(self, statement: str, dbname: str = "postgres") -> str:
        """Run one statement with psql (outside any transaction, as CREATE DATABASE needs)."""
        return self._run(
            str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", dbname,
            "-c", statement,
        )  # fmt: skip

    def create_database(self, name: str, template: str | None = None) -> str:
        """A new database (copied from ``template`` when given); returns its URL."""
        clause = f" TEMPLATE {template}" if template else ""
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sql(f"CREATE DATABASE {name}{clause}")
                return self.url(name)
            except RuntimeError as exc:
                # A connection to the template that is just closing still counts as "being
                # accessed by other users" for a moment.
                if "being accessed by other users" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def drop_database(self, name: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
