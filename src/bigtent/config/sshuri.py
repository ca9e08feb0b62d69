"""SSH builder addresses and pinned host keys as pure values: what ``[[ssh_builders]]``
entries (and a Nix machines file) are checked with.

A builder URI is ``ssh://[user@]host[:port]`` with the Nix store settings ``remote-store`` and
``remote-program`` as its query; a pinned host key is ``type base64`` or a full known_hosts
line. Nix splits ``NIX_SSHOPTS`` and machine lines on whitespace, so whitespace in any value
put there is refused here. Nothing in this module does I/O.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import struct
from dataclasses import dataclass
from urllib.parse import parse_qsl

from bigtent.errors import ConfigError

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

SSH_SCHEME = "ssh://"
_USER_RE = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._+-]*")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")


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
    if not uri.startswith(SSH_SCHEME):
        scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
        hint = f" ({scheme} is not supported: use ssh://)" if scheme else ""
        raise ConfigError(f"SSH builder URI must be ssh://[user@]host[:port] (got {uri!r}){hint}")
    rest = uri[len(SSH_SCHEME) :].split("?", 1)[0]
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


def check_no_whitespace(what: str, value: str) -> None:
    """Nix splits ``NIX_SSHOPTS`` on whitespace: a value with whitespace cannot pass through."""
    if not value:
        raise ConfigError(f"{what} must not be empty")
    if any(c.isspace() for c in value):
        raise ConfigError(
            f"{what} must not contain whitespace (got {value!r}): Nix splits NIX_SSHOPTS and "
            "builder lines on whitespace; use a path without spaces"
        )
