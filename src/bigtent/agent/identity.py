"""Who an agent is: its machine id, name, host name and systems (architecture §4).

A persistent agent keeps its machine id in ``WORK_DIR/machine-id`` so that it reconnects as the
same machine and the runner keeps its leases. An ephemeral agent gets a fresh id on every start,
never written to disk, and a unique name derived from its base name, the GitHub Actions run and
the id (``ephemeral_name``); the session only ever sees an ``AgentIdentity``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bigtent.config import AgentSection
from bigtent.errors import ConfigError
from bigtent.nix.store import NixStore
from bigtent.protocol import MAX_NAME_CHARS, MachineId

log = logging.getLogger(__name__)

MACHINE_ID_FILE = "machine-id"
"""File under the agent's work dir holding its persistent machine id."""
MAX_EPHEMERAL_NAME_BYTES = 128
"""architecture §4: an ephemeral agent's whole name, in UTF-8 bytes."""
MACHINE_ID_SUFFIX_CHARS = 8
_MAX_RUN_ID_DIGITS = 20
_MAX_RUN_ATTEMPT_DIGITS = 10


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """What the agent says about itself in ``register``."""

    machine_id: MachineId
    name: str
    hostname: str
    systems: tuple[str, ...]
    ephemeral: bool = False
    launch_id: str | None = None


def load_machine_id(work_dir: Path) -> MachineId:
    """Read ``WORK_DIR/machine-id``, creating it (mode 0600, a UUID4 hex) on first start.

    Creation is atomic (write a temporary file, then link it into place), so two agents started
    at once on one work dir agree on the id instead of one overwriting the other.
    """
    path = work_dir / MACHINE_ID_FILE
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    except OSError as exc:
        raise ConfigError(f"cannot read the agent machine id {path}: {exc}") from exc
    if existing:
        if not _valid_machine_id(existing):
            raise ConfigError(
                f"agent machine id file {path} does not hold a machine id (got {existing[:40]!r});"
                " delete it to make a new one"
            )
        return MachineId(existing)
    machine_id = uuid.uuid4().hex
    tmp = work_dir / f".{MACHINE_ID_FILE}.{os.getpid()}.tmp"
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(machine_id + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            # Another agent won the race: use its id.
            return load_machine_id(work_dir)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the agent machine id file {path}: {exc}; check agent.work_dir"
        ) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    log.info("created machine id %s in %s", machine_id, path)
    return MachineId(machine_id)


def _valid_machine_id(text: str) -> bool:
    return 0 < len(text) <= 64 and all(c in "0123456789abcdef-" for c in text)


def default_name() -> str:
    """The agent's name when none is configured: the host name, cut to the protocol's limit."""
    return socket.gethostname()[:MAX_NAME_CHARS] or "agent"


async def resolve_systems(section: AgentSection, store: NixStore) -> tuple[str, ...]:
    """The configured systems, or Nix's ``builtins.currentSystem`` when none are configured."""
    if section.systems:
        return tuple(section.systems)
    return (await store.current_system(),)


async def persistent_identity(section: AgentSection, store: NixStore) -> AgentIdentity:
    """The identity of a persistent agent: machine id from its work dir, name, systems."""
    hostname = socket.gethostname()
    return AgentIdentity(
        machine_id=load_machine_id(section.work_dir),
        name=(section.name or default_name())[:MAX_NAME_CHARS],
        hostname=hostname,
        systems=await resolve_systems(section, store),
        launch_id=section.launch_id,
    )


def _digits(value: str | None, max_len: int) -> str | None:
    """A GitHub run id/attempt as given, or None when unset or not a plain decimal number."""
    value = (value or "").strip()
    if value and len(value) <= max_len and value.isascii() and value.isdigit():
        return value
    return None


def ephemeral_name(base: str, machine_id: str, env: Mapping[str, str]) -> str:
    """The unique name of an ephemeral agent (architecture §4).

    ``base`` + ``-gh<GITHUB_RUN_ID>.<GITHUB_RUN_ATTEMPT>`` (``-gh<GITHUB_RUN_ID>`` without an
    attempt; nothing without a run id) + ``-`` + the first 8 hex digits of the machine id. The
    whole name is at most 128 UTF-8 bytes: the base is cut on a character boundary, the suffix
    is always kept. Run ids and attempts that are not plain numbers (at most 20 and 10 digits)
    are ignored, so the suffix stays short enough to keep.
    """
    suffix = ""
    run_id = _digits(env.get("GITHUB_RUN_ID"), _MAX_RUN_ID_DIGITS)
    if run_id is not None:
        suffix = f"-gh{run_id}"
        attempt = _digits(env.get("GITHUB_RUN_ATTEMPT"), _MAX_RUN_ATTEMPT_DIGITS)
        if attempt is not None:
            suffix += f".{attempt}"
    short_id = "".join(c for c in machine_id.lower() if c in "0123456789abcdef")
    suffix += "-" + short_id[:MACHINE_ID_SUFFIX_CHARS]
    room = MAX_EPHEMERAL_NAME_BYTES - len(suffix.encode())
    # errors="ignore" drops the partial character a byte cut leaves at the end.
    cut = base.encode()[:room].decode(errors="ignore")
    return cut + suffix


def new_machine_id() -> MachineId:
    """A fresh machine id (UUID4 hex), as persistent agents keep in their work dir."""
    return MachineId(uuid.uuid4().hex)


async def ephemeral_identity(
    section: AgentSection,
    store: NixStore,
    *,
    env: Mapping[str, str] | None = None,
    new_id: Callable[[], MachineId] = new_machine_id,
) -> AgentIdentity:
    """The identity of an ephemeral agent: a fresh machine id that is never written to disk,
    and a unique name (``ephemeral_name``), so every run is a new machine to the runner."""
    machine_id = new_id()
    hostname = socket.gethostname()
    return AgentIdentity(
        machine_id=machine_id,
        name=ephemeral_name(
            section.name or default_name(), machine_id, os.environ if env is None else env
        ),
        hostname=hostname,
        systems=await resolve_systems(section, store),
        ephemeral=True,
        launch_id=section.launch_id,
    )
