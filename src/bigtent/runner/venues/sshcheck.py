"""``bigtent ssh check``: connect to one SSH builder as the runner would and ask its Nix version."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bigtent.config import SshBuilderSection
from bigtent.config.sshuri import (
    check_no_whitespace,
    store_settings,
)
from bigtent.errors import BigtentError, ConfigError, NixError
from bigtent.runner.venues.ssh import (
    known_hosts_line,
    nix_sshopts,
    ssh_argv,
)

SSH_EXIT_CONNECT = 255
"""ssh's own failures (connection, authentication, host key) exit 255."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    nix_version: str


def check_ssh_builder(
    builder: SshBuilderSection, *, require_host_key: bool, connect_timeout_secs: int
) -> CheckResult:
    """Run ``ssh <hardened options> host nix-store --version``; BigtentError on any failure.

    The options are the runner's own (architecture §6). An unpinned builder is refused when
    ``require_host_key`` holds, since the runner would never use it; otherwise ssh checks the
    host against the user's known_hosts, still with ``StrictHostKeyChecking=yes``.
    """
    target = builder.target
    if builder.host_key is None and require_host_key:
        raise ConfigError(
            f"SSH builder {builder.name} has no host_key and ssh_require_host_key = true: "
            "the runner never uses it; pin its key first"
        )
    ssh = shutil.which("ssh")
    if ssh is None:
        raise BigtentError("ssh is not installed (not found in PATH)")
    with tempfile.TemporaryDirectory(prefix="bigtent-ssh-") as tmp:
        check_no_whitespace("the temporary directory", tmp)
        if builder.host_key is not None:
            known_hosts = Path(tmp) / "known_hosts"
            known_hosts.write_text(known_hosts_line(target, builder.host_key) + "\n")
            known_hosts_file = str(known_hosts)
        else:
            known_hosts_file = str(Path.home() / ".ssh" / "known_hosts")
        opts = nix_sshopts(
            ssh_key=builder.ssh_key,
            known_hosts_file=known_hosts_file,
            port=target.port,
            connect_timeout_secs=connect_timeout_secs,
        )
        program = store_settings(builder.uri).remote_program or "nix-store"
        argv = ssh_argv(target, opts, [program, "--version"])
        argv[0] = ssh
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=connect_timeout_secs + 30,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise NixError(
                f"SSH builder {builder.name}: no answer within {connect_timeout_secs + 30} s",
                argv=argv,
            ) from exc
    stderr = proc.stderr.strip()
    last = stderr.splitlines()[-1] if stderr else "no error output"
    if proc.returncode == SSH_EXIT_CONNECT:
        raise NixError(
            f"cannot connect to SSH builder {builder.name}: {last}",
            argv=argv,
            status=proc.returncode,
            stderr=stderr,
        )
    if proc.returncode != 0:
        raise NixError(
            f"SSH builder {builder.name}: connected, but 'nix-store --version' failed "
            f"(exit {proc.returncode}): {last}",
            argv=argv,
            status=proc.returncode,
            stderr=stderr,
        )
    return CheckResult(name=builder.name, nix_version=proc.stdout.strip())
