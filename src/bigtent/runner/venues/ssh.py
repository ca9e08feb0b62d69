"""SSH remote builders as pure values: pinned known_hosts lines, NIX_SSHOPTS, machine lines,
the machines file, the TOML of ``[[ssh_builders]]``.

architecture §6: every connection uses ``StrictHostKeyChecking=yes`` against a temporary known_hosts
file holding only the builder's pinned key, no agent, no password prompts, and a connect timeout.
Nix splits ``NIX_SSHOPTS`` on whitespace, so whitespace in any path put there is refused here.
A builder's URI and host key are parsed by ``bigtent.config.sshuri`` (the config checks them).
Nothing in this module does I/O; the SSH venue writes the files and spawns the processes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from urllib.parse import quote

from pydantic import ValidationError

from bigtent.config.ssh import SshBuilderSection
from bigtent.config.sshuri import (
    DEFAULT_SSH_PORT,
    KEY_TYPES,
    SSH_SCHEME,
    SshTarget,
    check_no_whitespace,
    normalize_host_key,
    parse_ssh_uri,
)
from bigtent.errors import ConfigError

_LIST_ITEM_RE = re.compile(r"[^\s,]+")


def known_hosts_line(target: SshTarget, host_key: str) -> str:
    """The one line of the temporary known_hosts file that pins ``target``'s host key.

    A bare key gets ``host`` (port 22 or none) or ``[host]:port`` in front, IPv6 bracketed only
    in the port form, exactly as ssh looks it up. A full known_hosts line is used as is: its
    host pattern must then match what ssh looks up, or the connection fails closed.
    """
    key = normalize_host_key(host_key)
    if key.split(maxsplit=1)[0] in KEY_TYPES:
        return f"{target.known_hosts_pattern()} {key}"
    return key


def nix_sshopts(
    *,
    ssh_key: str | None,
    known_hosts_file: str,
    port: int | None,
    connect_timeout_secs: int,
) -> str:
    """The ``NIX_SSHOPTS`` value for one builder (architecture §6), options in a fixed order.

    ``GlobalKnownHostsFile=/dev/null`` keeps the system-wide known_hosts from widening the pin.
    ``-p`` is added for a port other than 22, since Nix's ``ssh://`` store URI takes no port.
    """
    check_no_whitespace("the temporary known_hosts path", known_hosts_file)
    if connect_timeout_secs < 1:
        raise ConfigError(f"SSH connect timeout must be at least 1 s (got {connect_timeout_secs})")
    opts = [
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts_file}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        "-o",
        "BatchMode=yes",
        "-o",
        f"ConnectTimeout={connect_timeout_secs}",
    ]
    if ssh_key is not None:
        check_no_whitespace("ssh_key", ssh_key)
        opts += ["-i", ssh_key]
    if port is not None and port != DEFAULT_SSH_PORT:
        if not 1 <= port <= 65535:
            raise ConfigError(f"SSH port must be 1-65535 (got {port})")
        opts += ["-p", str(port)]
    return " ".join(opts)


def _list_field(what: str, items: Sequence[str]) -> str:
    for item in items:
        if not _LIST_ITEM_RE.fullmatch(item):
            raise ConfigError(f"{what} entries must be non-empty, without commas or whitespace")
    return ",".join(items) if items else "-"


def _speed_text(speed_factor: float) -> str:
    # Nix 2.8 reads the speed factor as an unsigned integer; newer Nix also takes a float.
    if speed_factor <= 0:
        raise ConfigError(f"speed_factor must be positive (got {speed_factor})")
    return str(int(speed_factor)) if float(speed_factor).is_integer() else repr(float(speed_factor))


def builders_line(
    target: SshTarget,
    *,
    systems: Sequence[str],
    ssh_key: str | None,
    max_jobs: int,
    speed_factor: float,
    supported_features: Sequence[str],
    mandatory_features: Sequence[str],
    remote_store: str | None = None,
    remote_program: str | None = None,
) -> str:
    """One Nix ``--builders`` machine line for ``target``.

    The URI is ``ssh://user@host`` without port (``-p`` goes in NIX_SSHOPTS) and without IPv6
    brackets (Nix 2.8 hands the host to ssh verbatim). The host key field is ``-``: the key is
    pinned through NIX_SSHOPTS' known_hosts file instead. Query values are percent-encoded.
    """
    if not systems:
        raise ConfigError(f"SSH builder {target.name()} needs at least one system")
    if max_jobs < 1:
        raise ConfigError(f"max_jobs must be at least 1 (got {max_jobs})")
    params = []
    if remote_store is not None:
        check_no_whitespace("remote_store", remote_store)
        params.append("remote-store=" + quote(remote_store, safe="/"))
    if remote_program is not None:
        check_no_whitespace("remote_program", remote_program)
        params.append("remote-program=" + quote(remote_program, safe="/"))
    uri = SSH_SCHEME + target.destination() + ("?" + "&".join(params) if params else "")
    if ssh_key is not None:
        check_no_whitespace("ssh_key", ssh_key)
    fields = [
        uri,
        _list_field("systems", systems),
        ssh_key or "-",
        str(max_jobs),
        _speed_text(speed_factor),
        _list_field("supported_features", supported_features),
        _list_field("mandatory_features", mandatory_features),
        "-",
    ]
    return " ".join(fields)


def _field(fields: list[str], i: int) -> str | None:
    if i >= len(fields) or fields[i] == "-":
        return None
    return fields[i]


def _split_list(text: str | None) -> list[str]:
    return [x for x in (text or "").split(",") if x]


def parse_machines_file(text: str) -> list[SshBuilderSection]:
    """Convert a Nix machines file (``/etc/nix/machines``) into ``[[ssh_builders]]`` entries.

    Fields: URI, systems (comma-separated), SSH key, max jobs, speed factor, supported and
    mandatory features, base64 public host key; ``-`` for empty, trailing fields optional. As in
    Nix, ``#`` starts a comment, ``;`` also separates entries and a URI without scheme means
    ``ssh://``. An entry without systems is refused (Nix would use its own system, which the
    runner cannot know). Errors name the line number.
    """
    out: list[SshBuilderSection] = []
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        for entry in raw_line.split("#", 1)[0].split(";"):
            fields = entry.split()
            if not fields:
                continue
            try:
                out.append(_machine_entry(fields))
            except ConfigError as exc:
                raise ConfigError(f"machines file line {lineno}: {exc.message}") from exc
            except ValidationError as exc:
                msgs = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
                )
                raise ConfigError(f"machines file line {lineno}: {msgs}") from exc
    return out


def _machine_entry(fields: list[str]) -> SshBuilderSection:
    if len(fields) > 8:
        raise ConfigError(f"{len(fields)} fields, at most 8 are allowed")
    uri = fields[0] if "://" in fields[0] else SSH_SCHEME + fields[0]
    parse_ssh_uri(uri)
    systems = _split_list(_field(fields, 1))
    if not systems:
        raise ConfigError("no systems given: name the builder's systems (field 2)")
    max_jobs_text = _field(fields, 3)
    speed_text = _field(fields, 4)
    host_key_b64 = _field(fields, 7)
    host_key: str | None = None
    if host_key_b64 is not None:
        try:
            decoded = base64.b64decode(host_key_b64, validate=True).decode()
        except (binascii.Error, ValueError) as exc:
            raise ConfigError("the host key (field 8) is not base64") from exc
        host_key = normalize_host_key(decoded, what="the host key (field 8)")
    try:
        max_jobs = int(max_jobs_text) if max_jobs_text is not None else 1
    except ValueError as exc:
        raise ConfigError(f"max jobs (field 4) is not a number (got {max_jobs_text!r})") from exc
    try:
        speed_factor = float(speed_text) if speed_text is not None else 1.0
    except ValueError as exc:
        raise ConfigError(f"speed factor (field 5) is not a number (got {speed_text!r})") from exc
    return SshBuilderSection(
        uri=uri,
        systems=systems,
        ssh_key=_field(fields, 2),
        max_jobs=max_jobs,
        speed_factor=speed_factor,
        supported_features=_split_list(_field(fields, 5)),
        mandatory_features=_split_list(_field(fields, 6)),
        host_key=host_key,
    )


def ssh_argv(target: SshTarget, sshopts: str, command: Sequence[str]) -> list[str]:
    """``ssh`` with ``sshopts`` split exactly as Nix splits NIX_SSHOPTS, then ``command``.

    ``--`` ends ssh's options, so nothing after it (the destination) is read as one.
    """
    return ["ssh", *sshopts.split(), "--", target.destination(), *command]


def find_builder(builders: Sequence[SshBuilderSection], name: str) -> SshBuilderSection:
    """The builder called ``name``: its name (``user@host[:port]``), its URI or its bare host.

    A bare host that several builders share is ambiguous and refused.
    """
    for b in builders:
        if name in (b.name, b.uri):
            return b
    by_host = [b for b in builders if b.target.host == name.strip("[]")]
    if len(by_host) == 1:
        return by_host[0]
    known = ", ".join(b.name for b in builders) or "none configured"
    if by_host:
        raise ConfigError(f"SSH builder name {name!r} is ambiguous: use one of {known}")
    raise ConfigError(f"no SSH builder named {name!r} (known: {known})")


def _toml_value(value: object) -> str:
    # JSON strings, numbers, booleans and lists of strings are valid TOML values too.
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


def render_ssh_builders_toml(builders: Sequence[SshBuilderSection]) -> str:
    """``[[ssh_builders]]`` tables for runner.toml; unset optional keys are left out."""
    blocks = []
    for b in builders:
        lines = ["[[ssh_builders]]"]
        for key, value in b.model_dump().items():
            if value is None or (key == "enabled" and value is True):
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + ("\n" if blocks else "")
