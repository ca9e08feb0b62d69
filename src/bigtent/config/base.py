"""What every config section shares: the base models, the TOML file plus
``BIGTENT_<SECTION>__<KEY>`` environment source, validation errors as ``ConfigError`` messages
that name the key, and the small parsers of listen addresses and lists.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from bigtent.errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A project's or an autoscale pool's name: also part of names on forges and of agents'
names, so no slashes, spaces or commas."""
REPOSITORY = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
"""``owner/repo`` on a forge."""
GIT_REF = re.compile(r"[^\s~^:?*\[\\]{1,255}")
"""A branch or tag name (what git refuses in one is refused here)."""


class Section(BaseModel):
    """A config section: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")


def toml_source(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


class FileSettings(BaseSettings):
    """Base: TOML file values, overridden by ``BIGTENT_<SECTION>__<KEY>`` environment."""

    model_config = SettingsConfigDict(
        env_prefix="BIGTENT_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the file; the file comes in as init kwargs.
        return (env_settings, init_settings)


def format_validation(exc: ValidationError, path: Path | None) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"config key {key}: {err['msg']}{shown}")
    where = f" in {path}" if path else ""
    return f"invalid configuration{where}:\n  " + "\n  ".join(lines)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value


def split_listen(listen: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` into its parts, or raise ConfigError."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ConfigError(f"config key runner.listen must be host:port (got {listen!r})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_comma_list(values: str | list[str] | tuple[str, ...]) -> list[str]:
    """Items given as comma-separated strings (``"x86_64-linux, i686-linux"``, as workflow
    inputs arrive) or repeated flags, or both: split on commas, trim, drop empties and
    repeats, keep the order."""
    items = [values] if isinstance(values, str) else values
    out: list[str] = []
    for value in items:
        for part in value.split(","):
            item = part.strip()
            if item and item not in out:
                out.append(item)
    return out


def comma_free_names(items: list[str]) -> list[str]:
    """A validator's check of names that travel comma-joined (systems and features in a Nix
    machine line or a workflow input): each non-empty, without commas or whitespace."""
    for item in items:
        if not item or any(c.isspace() or c == "," for c in item):
            raise ValueError(f"entries must be non-empty, without commas or whitespace ({item!r})")
    return items


def web_url(v: str, schemes: tuple[str, ...] = ("https",), *, why: str = "") -> str:
    """A validator's check of a URL bigtent calls (an issuer, an API, an endpoint): one of
    ``schemes`` with a host, and no query, fragment or credentials; ``v`` as given."""
    url = urlsplit(v)
    if url.scheme not in schemes or not url.hostname:
        wanted = " or ".join(f"{s}://" for s in schemes)
        raise ValueError(f"must be an {wanted} URL with a host" + (f": {why}" if why else ""))
    if url.query or url.fragment or url.username or url.password:
        raise ValueError("must not carry a query, fragment or credentials")
    return v
