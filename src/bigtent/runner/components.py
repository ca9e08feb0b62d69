"""The runner's parts, built once at start and handed to the routes (no global singletons)."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent import protocol as p
from bigtent.config import RunnerConfig
from bigtent.errors import ConfigError
from bigtent.nix.keys import SecretKey, generate_key, load_secret_key
from bigtent.runner.auth.oidc import OidcVerifier
from bigtent.runner.auth.ratelimit import AuthFailureLimiter, FailureThrottle
from bigtent.runner.auth.tokens import TokenRegistry, TokenStore
from bigtent.runner.autoscale.service import Autoscaler, build_workflows
from bigtent.runner.cache.presigned import PresignedUploads
from bigtent.runner.cache.s3 import S3Storage
from bigtent.runner.cache.service import Cache
from bigtent.runner.cache.storage import LocalStorage, Storage
from bigtent.runner.cache.upstreams import Upstreams
from bigtent.runner.ci.service import CiService
from bigtent.runner.db.migrate import check_schema, create_engine
from bigtent.runner.db.notify import Change, ChangeFeed, make_feed
from bigtent.runner.forge.model import Reporter
from bigtent.runner.forge.null import NullReporter
from bigtent.runner.forge.service import ForgeReporter
from bigtent.runner.logs.store import LogStore
from bigtent.runner.metrics import Metrics
from bigtent.runner.retention.collector import Collector
from bigtent.runner.retention.gate import FileGate
from bigtent.runner.retention.pins import Pins
from bigtent.runner.retention.usage import UsageRecorder
from bigtent.runner.scheduler.service import Scheduler
from bigtent.runner.venues.sessions import Sessions
from bigtent.runner.venues.sshvenue import SshBuilders

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Components:
    config: RunnerConfig
    engine: AsyncEngine
    cache: Cache
    upstreams: Upstreams
    scheduler: Scheduler
    logs: LogStore
    tokens: TokenRegistry
    sessions: Sessions
    ssh: SshBuilders
    """The ``[[ssh_builders]]`` venues (none configured: an empty set)."""
    token_store: TokenStore
    """Tokens in the database (the API's ``/tokens``), mirrored into ``tokens``."""
    auth_throttle: FailureThrottle
    """Credential failures per address, shared by the HTTP gate and the agent WebSocket."""
    presigned: PresignedUploads
    """Presigned uploads of agent outputs (answers "PUT to the runner" with local storage)."""
    oidc: OidcVerifier | None = None
    """Verifies agents' OIDC ID tokens; None when no ``[[auth.oidc]]`` issuer is configured."""
    metrics: Metrics = field(default_factory=Metrics)
    """The runner's Prometheus metrics (``/metrics``, docs/metrics.md)."""
    autoscaler: Autoscaler | None = None
    """The ``[[autoscale.github]]`` pools (no pools: present, with nothing to do)."""
    untrusted_cache: Cache | None = None
    """The untrusted cache (``/cache/untrusted``): outputs of untrusted builds, its own key."""
    feed: ChangeFeed | None = None
    """What other runners on the same database change (PostgreSQL: LISTEN/NOTIFY)."""
    reporter: Reporter = field(default_factory=NullReporter)
    """Where CI results go: the forge outbox (``ForgeReporter``); tests may give another."""
    ci: CiService | None = None
    """Nix CI: projects, webhooks, evaluations (docs/ci.md)."""
    usage: UsageRecorder | None = None
    """When cached paths were last asked for (flushed in batches; docs/cache.md)."""
    collector: Collector | None = None
    """Cache retention: mark and sweep, on a schedule and on demand (``bigtent gc``)."""
    pins: Pins | None = None
    """Named pins (``bigtent pin``)."""

    async def on_change(self, change: Change | None) -> None:
        """Another runner changed steps, builds or tokens (None: anything may have)."""
        if change is None or change.steps or change.builds:
            self.scheduler.notice(change)
        if change is None or change.tokens:
            await self.token_store.reload()


async def build_components(config: RunnerConfig) -> Components:
    """Open the database (whose schema must be this bigtent's: the runner never migrates
    it, ``bigtent db migrate`` does), the cache and the scheduler's state."""
    config.check_transport_security()
    config.check_autoscale()
    state_dir = config.runner.state_dir
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"config key runner.state_dir: cannot create {state_dir}: {exc.strerror}"
        ) from exc
    key_path = config.signing_key_path()
    try:
        key = load_secret_key(key_path)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"cache signing key {key_path} does not exist: create one with "
            f"`bigtent keys generate NAME` and set cache.signing_key_file"
        ) from exc
    except ValueError as exc:
        raise ConfigError(f"cache signing key {key_path} is invalid: {exc}") from exc
    untrusted_key = load_untrusted_key(config, key)
    tokens = TokenRegistry.from_config(config.auth.tokens)
    # Built before anything that needs closing: its only failure is a bad ca_file.
    oidc = OidcVerifier(config.auth.oidc) if config.auth.oidc else None
    workflows = build_workflows(config.autoscale)  # fails on an unreadable token
    engine = create_engine(config.database_url())
    try:
        await check_schema(engine)
    except BaseException:
        await engine.dispose()
        raise
    feed = make_feed(engine)
    token_store = TokenStore(engine, tokens, config, feed)
    await token_store.load()
    auth = config.auth
    auth_throttle = FailureThrottle(
        AuthFailureLimiter(
            auth.max_failures_per_address, auth.failure_window_secs, auth.max_tracked_addresses
        )
    )
    metrics = Metrics()
    storage = await open_storage(config)
    usage = UsageRecorder(engine)
    gate = FileGate()
    cache = Cache(
        engine,
        storage,
        key,
        config.cache,
        config.runner.base_url(),
        metrics,
        gate=gate,
        usage=usage,
    )
    # NAR files are named by their own hash: both caches share the storage, not the index.
    untrusted_cache = Cache(
        engine,
        storage,
        untrusted_key,
        config.cache,
        config.runner.base_url(),
        metrics,
        untrusted=True,
        gate=gate,
        usage=usage,
    )
    collector = Collector(engine, config.cache.retention, cache, untrusted_cache, usage, metrics)
    upstreams = Upstreams(
        config.cache.upstreams,
        config.cache.upstream_max_in_flight,
        config.cache.upstream_timeout_secs,
    )
    logs = LogStore(state_dir / "logs", config.scheduler.max_log_bytes)
    scheduler = Scheduler(
        engine,
        config.scheduler,
        logs,
        cache.present,
        metrics=metrics,
        untrusted_outputs_present=untrusted_cache.present,
        feed=feed,
    )
    await scheduler.load()
    autoscaler = Autoscaler(
        config.autoscale, workflows, engine, scheduler, clock=scheduler.clock, metrics=metrics
    )
    await autoscaler.load()
    sessions = Sessions(
        config,
        engine,
        scheduler,
        tokens,
        cache.url,
        cache.public_key,
        auth_throttle,
        oidc,
        metrics,
        launches=autoscaler,
        untrusted_cache=p.Substituter(
            url=untrusted_cache.url, public_key=untrusted_cache.public_key
        ),
    )
    ssh = SshBuilders(config, scheduler, cache, upstreams)
    ssh.attach()
    s3 = cache.storage if isinstance(cache.storage, S3Storage) else None
    presigned = PresignedUploads(
        cache,
        upstreams,
        scheduler,
        s3,
        enabled=config.cache.s3 is not None and config.cache.s3.presigned_uploads,
        untrusted=untrusted_cache,
    )
    # Reports to forges go through a durable outbox; its loop is idle while nothing is pending.
    reporter: Reporter = ForgeReporter(engine, config.forge, clock=scheduler.clock, metrics=metrics)
    ci = CiService(
        config,
        engine,
        cache,
        untrusted_cache,
        upstreams,
        scheduler,
        logs,
        reporter,
        clock=scheduler.clock,
    )
    await ci.load()
    return Components(
        config,
        engine,
        cache,
        upstreams,
        scheduler,
        logs,
        tokens,
        sessions,
        ssh,
        token_store,
        auth_throttle,
        presigned,
        oidc,
        metrics,
        autoscaler,
        untrusted_cache,
        feed,
        reporter,
        ci,
        usage,
        collector,
        Pins(engine),
    )


def load_untrusted_key(config: RunnerConfig, main: SecretKey) -> SecretKey:
    """The untrusted cache's signing key. Beside the main key by default, generated there on
    first start (named after the main key, ``NAME-untrusted``: Nix keys its trusted keys by
    name, so a client trusting both caches needs two names). A configured
    ``cache.untrusted_signing_key_file`` must exist."""
    path = config.untrusted_signing_key_path()
    if not path.exists() and config.cache.untrusted_signing_key_file is None:
        name = f"{main.name}-untrusted"
        try:
            _write_new_secret(path, generate_key(name).to_text() + "\n")
            log.info("generated the untrusted cache's signing key %s in %s", name, path)
        except FileExistsError:
            pass  # another runner on the same state made it meanwhile
        except OSError as exc:
            raise ConfigError(
                f"cannot create the untrusted cache's signing key {path}: {exc.strerror}; "
                "create one with `bigtent keys generate NAME` and set "
                "cache.untrusted_signing_key_file"
            ) from exc
    try:
        key = load_secret_key(path)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"untrusted cache signing key {path} does not exist: create one with "
            "`bigtent keys generate NAME` or unset cache.untrusted_signing_key_file"
        ) from exc
    except ValueError as exc:
        raise ConfigError(f"untrusted cache signing key {path} is invalid: {exc}") from exc
    if key.name == main.name:
        raise ConfigError(
            f"the untrusted cache's key {path} has the main key's name {key.name!r}: Nix "
            "tells trusted keys apart by name, give it another one"
        )
    return key


def _write_new_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


async def open_storage(config: RunnerConfig) -> Storage:
    """The NAR storage ``[cache] storage`` names; an S3 bucket is checked to be usable."""
    root = config.runner.state_dir / "cache"
    if config.cache.storage == "s3":
        if config.cache.s3 is None:
            raise ConfigError('config key cache.storage = "s3" needs a [cache.s3] section')
        s3 = S3Storage(config.cache.s3, root / "tmp")
        await asyncio.to_thread(s3.check_bucket)
        return s3
    return LocalStorage(root)


async def close_components(comps: Components) -> None:
    if comps.usage is not None:
        try:
            await comps.usage.flush()  # the last uses, so a restart does not lose them
        except (SQLAlchemyError, OSError) as exc:
            log.warning("could not record the last uses of cached paths: %s", exc)
    for session in list(comps.sessions.live.values()):
        session.close()
    await comps.ssh.aclose()
    await comps.upstreams.aclose()
    comps.cache.close()
    if comps.untrusted_cache is not None:
        comps.untrusted_cache.close()
    comps.logs.close_all()
    if comps.oidc is not None:
        await comps.oidc.aclose()
    if comps.autoscaler is not None:
        await comps.autoscaler.aclose()
    await comps.engine.dispose()
