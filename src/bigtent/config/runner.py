"""The runner's config: ``[runner]`` (listen address, TLS, who may read metrics and the
dashboard), ``[database]``, ``[scheduler]`` and the whole ``RunnerConfig`` with its start-up
checks and its loader (docs/configuration.md).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from bigtent.config.auth import AuthSection
from bigtent.config.autoscale import AutoscaleSection, check_pools
from bigtent.config.base import (
    FileSettings,
    Section,
    format_validation,
    is_loopback,
    merge,
    split_listen,
    toml_source,
)
from bigtent.config.cache import CacheSection
from bigtent.config.ci import EvaluationSection, ProjectSection
from bigtent.config.forge import ForgeSection
from bigtent.config.ssh import SshBuilderSection
from bigtent.errors import ConfigError
from bigtent.protocol import MAX_BYTES, MAX_SECS


class MetricsAuth(StrEnum):
    """Who may read ``/metrics`` (docs/metrics.md)."""

    PUBLIC = "public"
    """Anyone who can reach the port (what Prometheus expects by default)."""
    TOKEN = "token"
    """A bearer token of role ``client`` or ``admin``."""


class DashboardAuth(StrEnum):
    """Who may read the dashboard (docs/dashboard.md); actions always need an admin token."""

    PUBLIC = "public"
    TOKEN = "token"
    """Any valid token: a login form (cookie) or an ``Authorization: Bearer`` header."""


class TlsSection(Section):
    cert_file: Path
    key_file: Path
    client_ca: Path | None = None
    pin_client_name: bool = False


class RunnerSection(Section):
    listen: str = "127.0.0.1:8080"
    """host:port to listen on; ``[::1]:8080`` for IPv6."""
    public_url: str = ""
    """URL agents and clients use to reach the runner; default derived from ``listen``."""
    state_dir: Path = Path("/var/lib/bigtent")
    allow_plaintext: bool = False
    tls: TlsSection | None = None
    metrics_auth: MetricsAuth | None = None
    """Unset: ``public`` on a loopback listen address, ``token`` elsewhere."""

    @property
    def metrics_auth_mode(self) -> MetricsAuth:
        """Who may read ``/metrics``: as configured, else public only on loopback."""
        if self.metrics_auth is not None:
            return self.metrics_auth
        return MetricsAuth.PUBLIC if is_loopback(self.host) else MetricsAuth.TOKEN

    dashboard_auth: DashboardAuth = DashboardAuth.PUBLIC
    """Reading the dashboard at ``/``: ``public``, or ``token`` (any valid token)."""
    header_timeout_secs: float = Field(default=10.0, gt=0, le=3600)
    """An HTTP request's line and headers must arrive within this time of the connection (or,
    on a kept-alive one, of the request's first byte); trickling does not extend it."""
    keep_alive_secs: int = Field(default=5, ge=1, le=3600)
    """An idle kept-alive HTTP connection is closed after this many seconds."""
    max_connections: int = Field(default=4096, ge=16, le=1_000_000)
    """Open connections (HTTP and agents' WebSockets) above which a new one closes the oldest
    still waiting for its request headers; kept below the file descriptor limit less 256."""

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]

    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host, port = split_listen(self.listen)
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{port}"


class DatabaseSection(Section):
    url: str = ""
    """SQLAlchemy URL; default ``sqlite+aiosqlite:///STATE_DIR/bigtent.db``."""


class SchedulerSection(Section):
    lease_secs: float = Field(default=60.0, gt=0, le=MAX_SECS)
    """How long a lease lives without a heartbeat naming its step."""
    heartbeat_secs: float = Field(default=10.0, gt=0, le=MAX_SECS)
    max_infra_attempts: int = Field(default=5, ge=1)
    retry_base_secs: float = Field(default=2.0, ge=0)
    retry_max_secs: float = Field(default=300.0, ge=0)
    agent_backoff_base_secs: float = Field(default=5.0, ge=0)
    agent_backoff_max_secs: float = Field(default=600.0, ge=0)
    unhealthy_after_failures: int = Field(default=3, ge=0)
    """A venue with this many consecutive infrastructure failures is unhealthy: no work
    during its backoff, then one step at a time until one succeeds (0: never)."""
    refuse_cooldown_secs: float = Field(default=2.0, ge=0)
    step_timeout_secs: float = Field(default=10 * 3600.0, gt=0, le=MAX_SECS)
    max_silent_secs: float = Field(default=3600.0, gt=0, le=MAX_SECS)
    max_log_bytes: int = Field(default=64 * 1024 * 1024, gt=0, le=MAX_BYTES)
    ephemeral_session_ttl_secs: float = Field(default=3600.0, gt=0)
    """Stale ephemeral agent rows (last seen longer ago than this) are pruned."""
    failure_cache_ttl_secs: float = Field(default=86400.0, ge=0)
    """A build failure is remembered this long: new builds fail that derivation at once."""
    capacity_grace_secs: float = Field(default=4 * 3600.0, ge=0)
    """How long a runnable step that no venue can take (no connected agent, SSH builder or
    autoscaler pool offers its system, features and trust) waits for capacity before it
    fails as ``unsupported``. Hours, not seconds: agents come back (a machine rebooting, a
    pool's runners being replaced), and a step failed too early is a build to restart."""
    min_free_store_bytes: int = Field(default=0, ge=0, le=MAX_BYTES)
    """An agent whose last heartbeat reported less free disk in its store than this gets no
    new steps until it reports more (after its own collection); 0 (the default): never
    judged. Agents that report no free disk, and SSH builders, are never held back."""
    log_retention_days: float = Field(default=0.0, ge=0, le=MAX_SECS / 86400)
    """Step logs of steps that finished longer ago than this are deleted (in batches, every
    ``log_retention_check_secs``); 0 (the default) keeps them forever."""
    log_retention_check_secs: float = Field(default=3600.0, gt=0, le=MAX_SECS)


class RunnerConfig(FileSettings):
    runner: RunnerSection = RunnerSection()
    database: DatabaseSection = DatabaseSection()
    cache: CacheSection = CacheSection()
    auth: AuthSection = AuthSection()
    scheduler: SchedulerSection = SchedulerSection()
    ssh_require_host_key: bool = True
    """An SSH builder without ``host_key`` is never used (architecture §6)."""
    ssh_builders: list[SshBuilderSection] = []
    ssh_store_min_free_bytes: int = Field(default=0, ge=0, le=MAX_BYTES)
    """Collect the runner's SSH-builder store (``STATE/ssh-store``, Nix's GC) after a step
    when its free disk is below this; 0 (the default): never."""
    ssh_store_target_free_bytes: int = Field(default=0, ge=0, le=MAX_BYTES)
    """How much free disk such a collection aims for (default: twice the minimum)."""
    autoscale: AutoscaleSection = AutoscaleSection()
    """``[[autoscale.github]]`` pools (docs/autoscaling.md)."""
    forge: ForgeSection = ForgeSection()
    """How evaluations are reported to GitHub and Forgejo/Gitea (docs/ci.md)."""
    projects: list[ProjectSection] = []
    """``[[projects]]``: git repositories the runner evaluates and builds (docs/ci.md)."""
    evaluation: EvaluationSection = EvaluationSection()

    def usable_ssh_builders(self) -> list[SshBuilderSection]:
        """Enabled builders; with ``ssh_require_host_key`` only those with a pinned key."""
        return [
            b
            for b in self.ssh_builders
            if b.enabled and (b.pinned or not self.ssh_require_host_key)
        ]

    def check_transport_security(self) -> None:
        """architecture §6: credentials never travel in plaintext off this machine.

        With tokens configured and no TLS the runner refuses to start, unless
        ``allow_plaintext = true`` and it listens on a loopback address. Pinning client
        certificate names needs a client CA to verify them.
        """
        r = self.runner
        if r.tls is not None and r.tls.pin_client_name and r.tls.client_ca is None:
            raise ConfigError(
                "config key runner.tls.pin_client_name needs runner.tls.client_ca: only "
                "certificates verified against that CA can name an agent"
            )
        if r.tls is None and (self.auth.tokens or self.auth.oidc):
            if not r.allow_plaintext:
                raise ConfigError(
                    "tokens or OIDC issuers are configured but TLS is not: set [runner.tls] "
                    "cert_file and key_file, or allow_plaintext = true on a loopback listen address"
                )
            if not is_loopback(r.host):
                raise ConfigError(
                    f"allow_plaintext is only honoured on a loopback address, not on {r.listen}: "
                    "configure [runner.tls]"
                )

    def check_autoscale(self) -> None:
        """Each pool's agents must be admitted by an ``[[auth.oidc]]`` issuer (ConfigError)."""
        check_pools(self.autoscale.github, self.auth.oidc)

    def database_url(self) -> str:
        return self.database.url or f"sqlite+aiosqlite:///{self.runner.state_dir / 'bigtent.db'}"

    def signing_key_path(self) -> Path:
        return self.cache.signing_key_file or self.runner.state_dir / "cache.sk"

    def untrusted_signing_key_path(self) -> Path:
        """The untrusted cache's key: configured, or beside the main key (``cache.sk`` ->
        ``cache-untrusted.sk``)."""
        if self.cache.untrusted_signing_key_file is not None:
            return self.cache.untrusted_signing_key_file
        main = self.signing_key_path()
        return main.with_name(f"{main.stem}-untrusted{main.suffix}")


def ssh_builder_warnings(cfg: RunnerConfig) -> list[str]:
    """What the runner logs once at start about SSH builders it skips or trusts less (pure)."""
    out = []
    for b in cfg.ssh_builders:
        if not b.enabled or b.pinned:
            continue
        if cfg.ssh_require_host_key:
            out.append(
                f"SSH builder {b.name} has no host_key and ssh_require_host_key = true: it is "
                "never used; pin its key (ssh-keyscan the host, check the fingerprint, set "
                "host_key)"
            )
        else:
            out.append(
                f"SSH builder {b.name} has no host_key: its host key is checked against the "
                "runner user's known_hosts only (ssh_require_host_key = false)"
            )
    return out


def load_runner_config(path: Path | None = None, **overrides: Any) -> RunnerConfig:
    """Load the runner config from ``path`` (optional), the environment and ``overrides``."""
    data = toml_source(path)
    merge(data, overrides)
    try:
        return RunnerConfig(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation(exc, path)) from exc
