"""The store a step builds in: the runner's caches as substituters, Nix's options and
environment per slot, and the CA bundle Nix trusts (``ca_file``).

``CacheSettings`` is what the runner announced in ``registered``; ``step_store`` turns it and
the agent's config into the ``NixStore`` of one slot (or of the start-up probe).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bigtent.config import AgentSection
from bigtent.errors import ConfigError
from bigtent.nix.compression import Compression
from bigtent.nix.store import NixStore
from bigtent.protocol import Registered

log = logging.getLogger(__name__)

XDG_CACHE_DIR = "xdg-cache"
"""Under the work dir: Nix's binary-cache lookup cache, private to this agent."""
NIX_CA_BUNDLE = "nix-ca-bundle.pem"
"""Under the work dir, with ``ca_file`` set: the certificates Nix trusts (``NIX_SSL_CERT_FILE``)."""
NIX_DEFAULT_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/nix/var/nix/profiles/default/etc/ssl/certs/ca-bundle.crt",
)
"""Where Nix looks for the system's CA bundle when ``NIX_SSL_CERT_FILE`` is not set."""


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The binary caches a step substitutes from, as the runner announced in ``registered``."""

    cache_url: str
    cache_public_key: str
    upstreams: tuple[tuple[str, str], ...] = ()
    """(url, public key) of each upstream cache, in order of preference."""
    lease_secs: float = 60.0
    """The runner's lease time: bounds how long an output upload is retried."""
    upload_compression: Compression | None = None
    """Set when the runner takes presigned uploads (``registered.presigned_uploads``): the
    compression output files must have. None: PUT each NAR to the runner."""
    compression_level: int = 0

    @classmethod
    def from_registered(cls, registered: Registered, runner_url: str) -> CacheSettings:
        compression = None
        if registered.presigned_uploads:
            try:
                compression = Compression(registered.compression)
            except ValueError:
                log.warning(
                    "the runner asks for %r files, which this agent cannot write: "
                    "uploading NARs to the runner instead",
                    registered.compression,
                )
        return cls(
            cache_url=join_runner_url(runner_url, registered.cache_url),
            cache_public_key=registered.cache_public_key,
            upstreams=tuple((u.url, u.public_key) for u in registered.upstreams),
            lease_secs=registered.lease_secs,
            upload_compression=compression,
            compression_level=registered.compression_level,
        )


def join_runner_url(runner_url: str, url: str) -> str:
    """Absolute URLs stay as they are; relative ones are on the runner."""
    if "://" in url:
        return url
    return runner_url.rstrip("/") + "/" + url.lstrip("/")


def nix_options(section: AgentSection, cache: CacheSettings) -> dict[str, str]:
    """``--option`` pairs for a step's realise: the runner's cache first, then upstreams.

    ``system-features`` is what the agent advertises (when it advertises any).
    ``narinfo-cache-negative-ttl = 0``: a path this agent once found missing (e.g. the output of
    a step it was building when the step moved elsewhere) may be in the cache a minute later.
    The agent's ``extra_nix_options`` come last and win.
    """
    urls = [cache.cache_url, *(url for url, _ in cache.upstreams)]
    keys = [cache.cache_public_key, *(key for _, key in cache.upstreams)]
    options = {
        "substituters": " ".join(u for u in urls if u),
        "trusted-public-keys": " ".join(k for k in keys if k),
        "narinfo-cache-negative-ttl": "0",
        # Build here, never on remote builders the host's nix.conf may name.
        "builders": "",
    }
    if section.sandbox_paths:
        options["extra-sandbox-paths"] = " ".join(section.sandbox_paths)
    features = sorted({*section.supported_features, *section.mandatory_features})
    if features:
        # Nix refuses a derivation whose requiredSystemFeatures its `system-features` lack;
        # the agent builds exactly what it advertises.
        options["system-features"] = " ".join(features)
    options.update(section.extra_nix_options)
    return options


def step_store(
    section: AgentSection, cache: CacheSettings, cache_dir: str, *, bin_dir: str = ""
) -> NixStore:
    """The store a step (or the start-up probe) builds in: the agent's store URI, its
    ``nix_options`` and environment (``nix_env``)."""
    return NixStore(
        store=section.store,
        options=nix_options(section, cache),
        env=nix_env(section, cache_dir),
        bin_dir=bin_dir,
    )


def nix_env(section: AgentSection, cache_dir: str) -> dict[str, str]:
    """Environment of the agent's Nix processes for a slot (``cache_dir``, e.g. ``slot-0``).

    ``XDG_CACHE_HOME`` per slot: Nix 2.8 processes sharing one ``binary-cache-v6.sqlite`` race
    on it ("constraint failed"). With ``ca_file``, ``NIX_SSL_CERT_FILE`` names the bundle of the
    runner's CA and the system's roots (``write_nix_ca_bundle``): Nix 2.8 reads no
    ``SSL_CERT_FILE`` and ignores ``--option ssl-cert-file``, so without it Nix could not
    substitute from a runner whose certificate a private CA signed.
    """
    env = {"XDG_CACHE_HOME": str(section.work_dir / XDG_CACHE_DIR / cache_dir)}
    if section.ca_file is not None:
        env["NIX_SSL_CERT_FILE"] = str(section.work_dir / NIX_CA_BUNDLE)
    return env


def nix_ca_bundle(ca_pem: str, system_pem: str | None) -> str:
    """The certificates for Nix's ``NIX_SSL_CERT_FILE``: the agent's ``ca_file`` (the runner's
    CA) first, then the system roots Nix would use otherwise, so upstream caches with public
    certificates still verify. Nix reads one file for every https substituter."""
    parts = [ca_pem.strip() + "\n"]
    if system_pem and system_pem.strip():
        parts.append(system_pem.strip() + "\n")
    return "\n".join(parts)


def system_ca_file(
    env: Mapping[str, str], exists: Callable[[str], bool] = os.path.exists
) -> str | None:
    """The CA bundle Nix uses on its own: ``NIX_SSL_CERT_FILE``, else the first
    of ``NIX_DEFAULT_CA_FILES`` that exists."""
    given = env.get("NIX_SSL_CERT_FILE")
    if given:
        return given
    return next((f for f in NIX_DEFAULT_CA_FILES if exists(f)), None)


def write_nix_ca_bundle(section: AgentSection, env: Mapping[str, str]) -> Path | None:
    """With ``ca_file`` set, write ``WORK/nix-ca-bundle.pem`` (``nix_ca_bundle``), the
    ``NIX_SSL_CERT_FILE`` of every Nix process the agent runs (``nix_env``); ``None`` without
    ``ca_file``."""
    if section.ca_file is None:
        return None
    try:
        ca_pem = section.ca_file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"config key agent.ca_file: cannot read {section.ca_file}: {exc}"
        ) from exc
    if "-----BEGIN CERTIFICATE-----" not in ca_pem:
        raise ConfigError(f"config key agent.ca_file: {section.ca_file} holds no PEM certificate")
    system_pem: str | None = None
    system = system_ca_file(env)
    if system is not None:
        try:
            system_pem = Path(system).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning(
                "cannot read the system CA bundle %s (%s): Nix trusts only %s",
                system,
                exc,
                section.ca_file,
            )
    path = section.work_dir / NIX_CA_BUNDLE
    tmp = path.with_name(f".{NIX_CA_BUNDLE}.{os.getpid()}.tmp")
    try:
        section.work_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(nix_ca_bundle(ca_pem, system_pem))
        tmp.replace(path)
    except OSError as exc:
        raise ConfigError(
            f"cannot write {path} (the CA bundle for Nix): {exc}; check agent.work_dir"
        ) from exc
    return path
