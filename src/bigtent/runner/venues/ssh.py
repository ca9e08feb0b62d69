"""SSH remote builders as pure values: URIs, pinned known_hosts lines, NIX_SSHOPTS, machines.

architecture §6: every connection uses ``StrictHostKeyChecking=yes`` against a temporary known_hosts
file holding only the builder's pinned key, no agent, no password prompts, and a connect timeout.
Nix splits ``NIX_SSHOPTS`` on whitespace, so whitespace in any path put there is refused here.
Nothing in this module does I/O; the SSH venue writes the files and spawns the processes.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote

from bigtent.errors import ConfigError

if TYPE_CHECKING:  # config imports this module; the model is loaded lazily where it is built
    from bigtent.config import SshBuilderSection

KEY_TYPES: frozenset[str] = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
"""Public host key types accepted in ``host_key`` (no certificates: a pin is one key)."""

DEFAULT_SSH_PORT = 22

_SCHEME = "ssh://"
_USER_RE = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._+-]*")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")
_LIST_ITEM_RE = re.compile(r"[^\s,]+")


@dataclass(frozen=True, slots=True)
class SshTarget:
    """Where an SSH builder lives; ``host`` never carries IPv6 brackets."""

    user: str | None
    host: str
    port: int | None

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def destination(self) -> str:
        """``user@host`` as ssh and Nix's ``ssh://`` store take it (no brackets, no port)."""
        return f"{self.user}@{self.host}" if self.user else self.host

    def known_hosts_pattern(self) -> str:
        """The name ssh looks up in known_hosts: ``host``, or ``[host]:port`` off port 22."""
        if self.port is None or self.port == DEFAULT_SSH_PORT:
            return self.host
        return f"[{self.host}]:{self.port}"

    def name(self) -> str:
        """A readable, stable name: ``user@host``, ``user@host:port``, ``[v6]:port``."""
        host = f"[{self.host}]" if self.is_ipv6 and self.port is not None else self.host
        base = f"{self.user}@{host}" if self.user else host
        return f"{base}:{self.port}" if self.port is not None else base


STORE_SETTINGS: frozenset[str] = frozenset({"remote-store", "remote-program"})
"""The Nix ``ssh://`` store settings a builder URI's query may carry (``store_settings``)."""


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Where the builder's Nix lives: ``remote-store`` (a store on the builder, e.g. a
    directory that is not ``/nix``) and ``remote-program`` (its ``nix-store``)."""

    remote_store: str | None = None
    remote_program: str | None = None


def store_settings(uri: str) -> StoreSettings:
    """The ``remote-store`` / ``remote-program`` settings of ``ssh://…?remote-store=…``.

    Values are percent-decoded (``builders_line`` encodes them again); other keys, repeated
    keys, empty values and whitespace are a ConfigError.
    """
    query = uri.split("#", 1)[0].partition("?")[2]
    if not query:
        return StoreSettings()
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise ConfigError(f"SSH builder URI {uri!r} has a malformed query") from exc
    found: dict[str, str] = {}
    for key, value in pairs:
        if key not in STORE_SETTINGS:
            raise ConfigError(
                f"SSH builder URI {uri!r}: unknown setting {key!r} "
                f"(supported: {', '.join(sorted(STORE_SETTINGS))})"
            )
        if key in found:
            raise ConfigError(f"SSH builder URI {uri!r} sets {key!r} twice")
        check_no_whitespace(key, value)
        found[key] = value
    return StoreSettings(found.get("remote-store"), found.get("remote-program"))


def parse_ssh_uri(uri: str) -> SshTarget:
    """Parse ``ssh://[user@]host[:port][?query]``; the query (Nix store settings, see
    ``store_settings``) is not part of the target.

    IPv6 hosts are ``[v6]`` or ``[v6]:port``; a bare v6 address is allowed without a port.
    Anything else (another scheme, a path, an empty host, a bad port, a user or host starting
    with ``-`` that ssh would read as an option) is a ConfigError.
    """
    if not uri.startswith(_SCHEME):
        scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
        hint = f" ({scheme} is not supported: use ssh://)" if scheme else ""
        raise ConfigError(f"SSH builder URI must be ssh://[user@]host[:port] (got {uri!r}){hint}")
    rest = uri[len(_SCHEME) :].split("?", 1)[0]
    if not rest or any(c.isspace() for c in rest) or "/" in rest or "#" in rest:
        raise ConfigError(f"SSH builder URI must be ssh://[user@]host[:port] (got {uri!r})")
    user: str | None = None
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
        if not _USER_RE.fullmatch(user):
            raise ConfigError(f"SSH builder URI {uri!r} has an invalid user name {user!r}")
    host, port_text = _split_host_port(uri, rest)
    port: int | None = None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ConfigError(f"SSH builder URI {uri!r} has an invalid port {port_text!r}")
        port = int(port_text)
    return SshTarget(user=user, host=host, port=port)


def _split_host_port(uri: str, hostport: str) -> tuple[str, str | None]:
    if hostport.startswith("["):
        inner, sep, after = hostport[1:].partition("]")
        if not sep:
            raise ConfigError(f"SSH builder URI {uri!r} has an unclosed '['")
        _check_ipv6(uri, inner)
        if after == "":
            return inner, None
        if not after.startswith(":"):
            raise ConfigError(f"SSH builder URI {uri!r}: expected ':port' after ']'")
        return inner, after[1:]
    if hostport.count(":") >= 2:  # a bare IPv6 address: it cannot carry a port
        _check_ipv6(uri, hostport)
        return hostport, None
    host, sep, port_text = hostport.partition(":")
    if not host:
        raise ConfigError(f"SSH builder URI {uri!r} has an empty host")
    if not _HOSTNAME_RE.fullmatch(host):
        raise ConfigError(f"SSH builder URI {uri!r} has an invalid host {host!r}")
    return host, (port_text if sep else None)


def _check_ipv6(uri: str, host: str) -> None:
    if not host:
        raise ConfigError(f"SSH builder URI {uri!r} has an empty host")
    if "%" in host:
        raise ConfigError(f"SSH builder URI {uri!r}: IPv6 zone ids ('%') are not supported")
    try:
        ipaddress.IPv6Address(host)
    except ValueError as exc:
        raise ConfigError(f"SSH builder URI {uri!r}: {host!r} is not an IPv6 address") from exc


def normalize_host_key(host_key: str, *, what: str = "host_key") -> str:
    """Validate a pinned key: ``type base64 [comment]`` or a full known_hosts line.

    A bare key becomes ``type base64`` (its comment dropped). A full line, with the host
    pattern at field 0 (plain or hashed ``|1|…``) and the key type at field 1, is returned
    stripped but otherwise as is. Comment lines, marker lines (``@cert-authority``,
    ``@revoked``: a pin is one key, not a trust anchor), several lines, unknown key types and
    key blobs that are not base64 of a key of the named type are refused.
    """
    line = host_key.strip()
    if "\n" in line or "\r" in line:
        raise ConfigError(f"{what} must be a single line (got {len(line.splitlines())} lines)")
    fields = line.split()
    if not fields:
        raise ConfigError(f"{what} is empty: give 'type base64' or a known_hosts line")
    if fields[0].startswith("#"):
        raise ConfigError(f"{what} is a comment, not a key: give 'type base64'")
    if fields[0].startswith("@"):
        raise ConfigError(
            f"{what}: known_hosts markers like {fields[0]!r} are not supported; "
            "pin the builder's own host key ('type base64')"
        )
    if fields[0] in KEY_TYPES:
        _check_key_blob(what, fields[0], fields[1] if len(fields) > 1 else "")
        return f"{fields[0]} {fields[1]}"
    if len(fields) >= 2 and fields[1] in KEY_TYPES:
        _check_key_blob(what, fields[1], fields[2] if len(fields) > 2 else "")
        return line
    raise ConfigError(
        f"{what} has no known key type at field 1 or 2 (got {line[:60]!r}); "
        f"expected one of {', '.join(sorted(KEY_TYPES))}"
    )


def _check_key_blob(what: str, key_type: str, blob: str) -> None:
    """The base64 blob must decode and name ``key_type`` first, as every SSH public key does."""
    if not blob:
        raise ConfigError(f"{what}: the {key_type} key has no base64 data")
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{what}: the {key_type} key data is not valid base64") from exc
    if len(raw) < 4:
        raise ConfigError(f"{what}: the {key_type} key data is too short")
    (n,) = struct.unpack(">I", raw[:4])
    if raw[4 : 4 + n] != key_type.encode():
        raise ConfigError(f"{what}: the key data does not hold a {key_type} key")


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


def check_no_whitespace(what: str, value: str) -> None:
    """Nix splits ``NIX_SSHOPTS`` on whitespace: a value with whitespace cannot pass through."""
    if not value:
        raise ConfigError(f"{what} must not be empty")
    if any(c.isspace() for c in value):
        raise ConfigError(
            f"{what} must not contain whitespace (got {value!r}): Nix splits NIX_SSHOPTS and "
            "builder lines on whitespace; use a path without spaces"
        )


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
    uri = _SCHEME + target.destination() + ("?" + "&".join(params) if params else "")
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
    from pydantic import ValidationError

    from bigtent.config import SshBuilderSection

    out: list[SshBuilderSection] = []
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        for entry in raw_line.split("#", 1)[0].split(";"):
            fields = entry.split()
            if not fields:
                continue
            try:
                out.append(_machine_entry(fields, SshBuilderSection))
            except ConfigError as exc:
                raise ConfigError(f"machines file line {lineno}: {exc.message}") from exc
            except ValidationError as exc:
                msgs = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
                )
                raise ConfigError(f"machines file line {lineno}: {msgs}") from exc
    return out


def _machine_entry(fields: list[str], model: type[SshBuilderSection]) -> SshBuilderSection:
    if len(fields) > 8:
        raise ConfigError(f"{len(fields)} fields, at most 8 are allowed")
    uri = fields[0] if "://" in fields[0] else _SCHEME + fields[0]
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
    return model(
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
