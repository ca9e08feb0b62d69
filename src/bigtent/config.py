"""Configuration: TOML files plus ``BIGTENT_<SECTION>__<KEY>`` environment overrides.

Every tuning constant lives here with its documented default (docs/configuration.md). Secrets
may be given as ``*_file`` keys, read once at load time. Validation errors become
``ConfigError`` messages that name the key, the value and what to do.
"""

from __future__ import annotations

import ipaddress
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from bigtent.errors import ConfigError
from bigtent.nix.compression import Compression
from bigtent.protocol import MAX_BYTES, MAX_LIST_ITEMS, MAX_SECS, MAX_SHORT_TEXT
from bigtent.runner.autoscale.settings import AutoscaleSection, check_pools
from bigtent.runner.cache.s3keys import normalize_prefix
from bigtent.runner.ci.settings import EvaluationSection, ProjectSection
from bigtent.runner.forge.settings import ForgeSection
from bigtent.runner.venues.ssh import (
    SshTarget,
    check_no_whitespace,
    normalize_host_key,
    parse_ssh_uri,
    store_settings,
)


class Role(StrEnum):
    """What a token may do (architecture §6)."""

    AGENT = "agent"
    CLIENT = "client"
    ADMIN = "admin"


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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsSection(_Section):
    cert_file: Path
    key_file: Path
    client_ca: Path | None = None
    pin_client_name: bool = False


class RunnerSection(_Section):
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


class DatabaseSection(_Section):
    url: str = ""
    """SQLAlchemy URL; default ``sqlite+aiosqlite:///STATE_DIR/bigtent.db``."""


class Upstream(_Section):
    url: str
    public_key: str


class S3Section(_Section):
    """``[cache.s3]``: NAR files in an S3 bucket (AWS or any S3-compatible service).

    Credentials: ``access_key_id``/``secret_access_key`` (or their ``*_file`` forms, read
    once at start); with neither, boto3's usual chain (``AWS_*`` environment, profile,
    instance role) applies.
    """

    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]+[a-z0-9]$")
    prefix: str = ""
    """Keys start with this (e.g. ``bigtent/``): ``<prefix>nar/...``, ``<prefix>incoming/...``."""
    region: str = "us-east-1"
    endpoint_url: str | None = None
    """``http(s)://host:port`` of an S3-compatible service; unset: AWS."""
    public_endpoint_url: str | None = None
    """The endpoint presigned URLs name, when agents and Nix clients reach the service by
    another address than the runner does; unset: ``endpoint_url``."""
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """``path`` (``host/bucket/key``) for most self-hosted services; ``virtual``
    (``bucket.host/key``); ``auto`` lets boto3 choose."""
    access_key_id: str | None = None
    access_key_id_file: Path | None = None
    secret_access_key: SecretStr | None = None
    secret_access_key_file: Path | None = None
    serve: Literal["redirect", "proxy"] = "redirect"
    """``/cache/nar/...``: a 302 to a short-lived presigned GET (Nix follows it), or the
    runner streams the object itself (clients that cannot reach the bucket)."""
    presigned_get_secs: int = Field(default=300, ge=1, le=7 * 86400)
    presigned_put_secs: int = Field(default=120, ge=1, le=7 * 86400)
    """How long a presigned PUT URL may be used to start a request (S3 allows at most 7 days;
    the agent asks for it just before its PUT, and every retry asks for a fresh one)."""
    presigned_uploads: bool = True
    """Offer agents presigned PUTs straight to the bucket; false: agents PUT to the runner."""
    incoming_ttl_secs: float = Field(default=86400.0, gt=0)
    """Uploaded objects never completed (agent gone) are deleted after this long."""
    sweep_interval_secs: float = Field(default=3600.0, gt=0)
    max_connections: int = Field(default=32, ge=1, le=1024)
    """Connection pool size of the runner's S3 client (and its worker threads' concurrency)."""

    @field_validator("prefix")
    @classmethod
    def _clean_prefix(cls, v: str) -> str:
        try:
            return normalize_prefix(v)
        except ValueError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("endpoint_url", "public_endpoint_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        url = urlsplit(v)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if url.query or url.fragment or url.username or url.password:
            raise ValueError("must not carry a query, fragment or credentials")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _one_credential_source(self) -> S3Section:
        for key in ("access_key_id", "secret_access_key"):
            if getattr(self, key) is not None and getattr(self, f"{key}_file") is not None:
                raise ValueError(f"set {key} or {key}_file, not both")
        given = [
            self.access_key_id is not None or self.access_key_id_file is not None,
            self.secret_access_key is not None or self.secret_access_key_file is not None,
        ]
        if any(given) and not all(given):
            raise ValueError("access_key_id and secret_access_key go together")
        return self

    def credentials(self) -> tuple[str, str] | None:
        """The configured key pair, ``*_file`` forms read now; None: boto3's default chain.
        Raises ConfigError naming the key when a file cannot be read."""
        key_id = self.access_key_id
        if self.access_key_id_file is not None:
            key_id = _read_secret("cache.s3.access_key_id_file", self.access_key_id_file)
        secret = self.secret_access_key.get_secret_value() if self.secret_access_key else None
        if self.secret_access_key_file is not None:
            secret = _read_secret("cache.s3.secret_access_key_file", self.secret_access_key_file)
        if key_id is None or secret is None:
            return None
        return key_id, secret


def _read_secret(key: str, path: Path) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"config key {key}: cannot read {path}: {exc.strerror}") from exc
    if not value:
        raise ConfigError(f"config key {key}: {path} is empty")
    return value


class RetentionPolicySection(_Section):
    max_idle_days: float = Field(default=30.0, ge=0)
    """Paths not used (narinfo or NAR asked for) nor published for this long, and kept by no
    root, are deleted. 0: never for being idle (only the quota deletes)."""
    quota_high_bytes: int | None = Field(default=None, gt=0)
    """Above this many bytes of NAR files a collection evicts unrooted paths, least recently
    used first. None: no quota."""
    quota_low_bytes: int | None = Field(default=None, gt=0)
    """What eviction brings the cache down to (default: ``quota_high_bytes``)."""

    @model_validator(mode="after")
    def _watermarks(self) -> RetentionPolicySection:
        if self.quota_low_bytes is not None:
            if self.quota_high_bytes is None:
                raise ValueError("quota_low_bytes needs quota_high_bytes")
            if self.quota_low_bytes > self.quota_high_bytes:
                raise ValueError("quota_low_bytes must not exceed quota_high_bytes")
        return self


class UntrustedRetentionSection(RetentionPolicySection):
    max_idle_days: float = Field(default=7.0, ge=0)


class RetentionSection(RetentionPolicySection):
    """``[cache.retention]``: what the runner's cache keeps (docs/cache.md)."""

    enabled: bool = True
    """Collect on a schedule (``bigtent gc`` works either way)."""
    interval_secs: float = Field(default=3600.0, gt=0)
    """Time between scheduled collections (the first one after this long)."""
    keep_builds: int = Field(default=3, ge=0, le=10_000)
    """Outputs of this many latest succeeded builds per repository/ref are roots."""
    grace_secs: float = Field(default=3600.0, ge=0)
    """Paths published or used this recently are never deleted."""
    sweep_batch: int = Field(default=500, ge=1, le=10_000)
    """Paths deleted per transaction (and NAR files per look at the storage)."""
    usage_flush_secs: float = Field(default=60.0, gt=0, le=3600)
    """How often the last uses of paths are written to the database (in one batch)."""
    untrusted: UntrustedRetentionSection = UntrustedRetentionSection()
    """``[cache.retention.untrusted]``: the untrusted cache's own idle limit and quota."""


class CacheSection(_Section):
    signing_key_file: Path | None = None
    """Default ``STATE_DIR/cache.sk``; generated by ``bigtent up`` and ``bigtent keys generate``."""
    untrusted_signing_key_file: Path | None = None
    """Key of the untrusted cache (``/cache/untrusted``, outputs of untrusted builds); default
    ``<signing key>-untrusted.sk`` beside the main key, generated at start when missing."""
    storage: Literal["local", "s3"] = "local"
    """Where NAR files live: ``STATE_DIR/cache``, or the ``[cache.s3]`` bucket."""
    s3: S3Section | None = None
    max_nar_bytes: int = Field(default=32 * 1024**3, gt=0)
    compression: Compression = Compression.ZSTD
    compression_level: int = Field(default=3, ge=0, le=22)
    """zstd: 1-19 (0: zstd's default, 3); xz: the preset 0-9 (higher values mean 9)."""
    priority: int = Field(default=30, ge=0)
    """``Priority`` in nix-cache-info (lower is preferred by Nix clients)."""
    upstreams: list[Upstream] = []
    upstream_max_in_flight: int = Field(default=16, ge=1)
    upstream_timeout_secs: float = Field(default=10.0, gt=0)
    retention: RetentionSection = RetentionSection()

    @model_validator(mode="after")
    def _s3_configured(self) -> CacheSection:
        if self.storage == "s3" and self.s3 is None:
            raise ValueError('storage = "s3" needs a [cache.s3] section (at least bucket)')
        return self


class TokenEntry(_Section):
    name: str
    role: Role
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    token_file: Path | None = None
    trusted: bool = False
    """A client token whose builds may count as trusted (architecture §6, trust scoping)."""

    @model_validator(mode="after")
    def _one_source(self) -> TokenEntry:
        if (self.sha256 is None) == (self.token_file is None):
            raise ValueError(f"token {self.name!r} needs exactly one of sha256 or token_file")
        return self


class OidcIssuerSection(_Section):
    """One ``[[auth.oidc]]`` issuer whose ID tokens agents may present (architecture §6, oidc.md).

    The allow-lists are exact matches; ``repositories`` empty admits nobody, the others restrict
    only when non-empty.
    """

    issuer: str
    """The token's ``iss``, matched exactly; an https URL (GitHub Actions:
    ``https://token.actions.githubusercontent.com``)."""
    audiences: list[str] = Field(min_length=1)
    """A token's ``aud`` must contain one of these."""
    jwks_url: str | None = None
    """Fetch keys here instead of through the issuer's discovery document (https)."""
    ca_file: Path | None = None
    """PEM CA bundle for a self-hosted issuer with a private CA (replaces the system roots)."""
    claims: Literal["github", "gitlab"] = "github"
    """Which claim names carry repository, workflow and ref: ``github`` (also Forgejo/Gitea
    Actions) or ``gitlab``."""
    repositories: list[str] = []
    subjects: list[str] = []
    subject_prefixes: list[str] = []
    workflow_refs: list[str] = []
    refs: list[str] = []
    allow_untrusted: bool = False
    """Agents of this rule are untrusted venues: they take only steps of untrusted builds
    (whose outputs never enter the main cache), never trusted ones (docs/security.md)."""
    build_repositories: list[str] | None = None
    """Repositories whose builds these agents may build; default ``repositories``; ``"*"``:
    any build, also one without a repository."""
    clients: bool = False
    """The ID tokens this rule admits may also act as a client (a CI job's
    ``bigtent-nix-hook --oidc github``, docs/nix-integration.md): upload sources and ``.drv``
    files, submit and follow builds. Those builds are untrusted and carry the job's
    repository."""
    refresh_interval_secs: float = Field(default=60.0, gt=0)
    """At most one key fetch per interval for unknown ``kid``s (a flood causes no flood)."""
    http_timeout_secs: float = Field(default=10.0, gt=0)
    leeway_secs: float = Field(default=60.0, ge=0, le=600)
    """Clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""

    @field_validator("issuer", "jwks_url")
    @classmethod
    def _https_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        url = urlsplit(v)
        if url.scheme != "https" or not url.hostname:
            raise ValueError("must be an https:// URL with a host")
        if url.query or url.fragment or url.username or url.password:
            raise ValueError("must not carry a query, fragment or credentials")
        return v

    @field_validator(
        "repositories",
        "subjects",
        "subject_prefixes",
        "workflow_refs",
        "refs",
        "build_repositories",
    )
    @classmethod
    def _no_empty_entries(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not item.strip() for item in v):
            raise ValueError("entries must be non-empty (an empty prefix would admit everyone)")
        return v

    @field_validator("audiences")
    @classmethod
    def _no_empty_audience(cls, v: list[str]) -> list[str]:
        if any(not item for item in v):
            raise ValueError("entries must be non-empty")
        return v


class AuthSection(_Section):
    tokens: list[TokenEntry] = []
    oidc: list[OidcIssuerSection] = []
    max_failures_per_address: int = Field(default=20, ge=1)
    """Credential failures (401s) one address may cause within ``failure_window_secs``;
    beyond that it is answered 429 until the window passes (docs/security.md)."""
    failure_window_secs: float = Field(default=60.0, gt=0)
    max_tracked_addresses: int = Field(default=10_000, ge=1)
    """Addresses the failure limiter remembers at once (bounded memory)."""


class SchedulerSection(_Section):
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


class SshBuilderSection(_Section):
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
        try:
            parse_ssh_uri(v)
            store_settings(v)
        except ConfigError as exc:
            raise ValueError(exc.message) from exc
        return v

    @field_validator("ssh_key")
    @classmethod
    def _valid_key_path(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                check_no_whitespace("ssh_key", v)
            except ConfigError as exc:
                raise ValueError(exc.message) from exc
        return v

    @field_validator("host_key")
    @classmethod
    def _valid_host_key(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        try:
            return normalize_host_key(v)
        except ConfigError as exc:
            raise ValueError(exc.message) from exc

    @field_validator("systems", "supported_features", "mandatory_features")
    @classmethod
    def _valid_names(cls, v: list[str]) -> list[str]:
        for item in v:
            if not item or any(c.isspace() or c == "," for c in item):
                raise ValueError(
                    f"entries must be non-empty, without commas or whitespace ({item!r})"
                )
        return v

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


def _toml_source(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


class _FileSettings(BaseSettings):
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


class RunnerConfig(_FileSettings):
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


class OidcProvider(StrEnum):
    """Where ``agent.oidc`` takes the agent's ID token from (docs/github-actions.md)."""

    GITHUB = "github"
    """The GitHub Actions job's ``ACTIONS_ID_TOKEN_REQUEST_URL``/``_TOKEN``."""


class EphemeralSection(_Section):
    max_builds: int | None = Field(default=None, ge=1)
    max_idle_secs: float = Field(default=120.0, gt=0)
    max_lifetime_secs: float | None = Field(default=None, gt=0)


class AgentSection(_Section):
    runner_url: str = "http://127.0.0.1:8080"
    name: str = ""
    """Default: the host name."""
    systems: list[str] = []
    """Default: the local Nix system plus its extra-platforms."""
    supported_features: list[str] = []
    mandatory_features: list[str] = []
    max_jobs: int = Field(default=1, ge=1, le=MAX_LIST_ITEMS)
    speed_factor: float = Field(default=1.0, gt=0)
    store: str = ""
    """Nix store URI; "" is the default store, ``local?root=DIR`` a separate one."""
    work_dir: Path = Path("/var/lib/bigtent-agent")
    token_file: Path | None = None
    ca_file: Path | None = None
    client_cert_file: Path | None = None
    """mTLS: the agent's certificate chain (PEM), presented to a runner with a client CA."""
    client_key_file: Path | None = None
    """The key of ``client_cert_file`` (default: in the same file)."""
    oidc: OidcProvider | None = None
    """Present the CI job's OIDC ID token instead of a token (``github``); implies ephemeral."""
    audience: str = Field(default="", max_length=MAX_SHORT_TEXT)
    """The ``aud`` to request the ID token for: one of the runner issuer's ``audiences``."""
    launch_id: str | None = Field(default=None, max_length=MAX_SHORT_TEXT)
    """Reported at register (the autoscaler's launch id); ``BIGTENT_LAUNCH_ID``."""
    ephemeral: EphemeralSection | None = None
    sandbox_paths: list[str] = []
    """Extra sandbox paths for builds (``extra-sandbox-paths``), e.g. host tools in tests."""
    extra_nix_options: dict[str, str] = {}
    """Further ``--option NAME VALUE`` pairs for every Nix command the agent runs."""
    untrusted: bool = False
    """Register as an untrusted venue: take only steps of untrusted builds (e.g. a machine
    that runs pull-request code), substituting from the untrusted cache too."""
    probe: bool = True
    """Build a tiny probe derivation at start, before registering, and exit 6 with Nix's
    error and a hint when it fails (``--skip-probe`` sets false)."""
    executor: Literal["serve", "realise"] = "serve"
    """How a step is built: ``serve`` (default) drives long-lived ``nix-store --serve --write``
    processes, one pair per slot; ``realise`` runs one ``nix-store --realise`` per step (for a
    Nix whose serve protocol differs)."""
    min_free_bytes: int = Field(default=0, ge=0, le=2**62)
    """Collect the agent's store (Nix's GC) when its free disk falls below this many bytes;
    0 (the default) never collects (docs/agents.md, "Disk budget")."""
    target_free_bytes: int = Field(default=0, ge=0, le=2**62)
    """How much free disk a collection aims for (default: twice ``min_free_bytes``)."""
    gc_check_secs: float = Field(default=30.0, gt=0, le=86400)
    """How often the agent looks at its free disk (it also looks after every step)."""

    @field_validator("launch_id")
    @classmethod
    def _blank_launch_id_is_none(cls, v: str | None) -> str | None:
        return (v or "").strip() or None

    @model_validator(mode="after")
    def _oidc_needs_audience(self) -> AgentSection:
        if self.oidc is not None:
            if not self.audience.strip():
                raise ValueError(
                    f"oidc = {self.oidc.value!r} needs an audience (agent.audience or "
                    "--audience): one of the runner's [[auth.oidc]] audiences"
                )
            if self.ephemeral is None:
                self.ephemeral = EphemeralSection()  # architecture §6: an OIDC agent is ephemeral
        return self


class AgentConfig(_FileSettings):
    agent: AgentSection = AgentSection()


def _format_validation(exc: ValidationError, path: Path | None) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"config key {key}: {err['msg']}{shown}")
    where = f" in {path}" if path else ""
    return f"invalid configuration{where}:\n  " + "\n  ".join(lines)


def load_runner_config(path: Path | None = None, **overrides: Any) -> RunnerConfig:
    """Load the runner config from ``path`` (optional), the environment and ``overrides``."""
    data = _toml_source(path)
    _merge(data, overrides)
    try:
        return RunnerConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, path)) from exc


def load_agent_config(path: Path | None = None, **overrides: Any) -> AgentConfig:
    """Load the agent config; ``overrides`` (from flags) win over file and environment."""
    data = _toml_source(path)
    try:
        cfg = AgentConfig(**data)
        if overrides:
            merged = cfg.model_dump()
            _merge(merged, overrides)
            cfg = AgentConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, path)) from exc
    return cfg


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
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
