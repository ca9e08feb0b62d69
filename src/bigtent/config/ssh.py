"""``[[ssh_builders]]``: machines Nix builds on over SSH (architecture §6).

The section validates each builder with the pure parsers of ``bigtent.config.sshuri``; what
the runner does with a builder (machine lines, ``NIX_SSHOPTS``, the machines file) is
``bigtent.runner.venues.ssh``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pydantic import Field, field_validator

from bigtent.config.base import Section, comma_free_names
from bigtent.config.sshuri import (
    SshTarget,
    check_no_whitespace,
    normalize_host_key,
    parse_ssh_uri,
    store_settings,
)
from bigtent.errors import ConfigError
from bigtent.protocol import MAX_LIST_ITEMS


@contextmanager
def _as_value_error() -> Iterator[None]:
    """The pure parsers raise ConfigError; pydantic reports a validator's ValueError under the
    key (``config key ssh_builders.0.uri: ...``)."""
    try:
        yield
    except ConfigError as exc:
        raise ValueError(exc.message) from exc


class SshBuilderSection(Section):
    """One ``[[ssh_builders]]`` entry: a machine Nix builds on over SSH (architecture §6)."""

    uri: str
    """``ssh://[user@]host[:port]``; ``[v6]:port`` for IPv6; ``?remote-store=DIR`` and
    ``remote-program=PATH`` for a builder whose Nix store or ``nix-store`` is elsewhere."""
    systems: list[str] = Field(min_length=1)
    max_jobs: int = Field(default=1, ge=1, le=MAX_LIST_ITEMS)
    speed_factor: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    supported_features: list[str] = []
    mandatory_features: list[str] = []
    ssh_key: str | None = None
    """Private key file; no whitespace (Nix splits NIX_SSHOPTS on it)."""
    host_key: str | None = None
    """Pinned public host key: ``type base64`` or a full known_hosts line."""
    enabled: bool = True

    @field_validator("uri")
    @classmethod
    def _valid_uri(cls, v: str) -> str:
        with _as_value_error():
            parse_ssh_uri(v)
            store_settings(v)
        return v

    @field_validator("ssh_key")
    @classmethod
    def _valid_key_path(cls, v: str | None) -> str | None:
        if v is not None:
            with _as_value_error():
                check_no_whitespace("ssh_key", v)
        return v

    @field_validator("host_key")
    @classmethod
    def _valid_host_key(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        with _as_value_error():
            return normalize_host_key(v)

    @field_validator("systems", "supported_features", "mandatory_features")
    @classmethod
    def _valid_names(cls, v: list[str]) -> list[str]:
        return comma_free_names(v)  # Nix's machine line joins them with commas

    @property
    def target(self) -> SshTarget:
        return parse_ssh_uri(self.uri)

    @property
    def name(self) -> str:
        """``user@host[:port]``: how logs, warnings and ``bigtent ssh check`` name it."""
        return self.target.name()

    @property
    def pinned(self) -> bool:
        return self.host_key is not None
