"""The runner's parts, built once at start and handed to the routes (no global singletons)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.config import RunnerConfig
from bigtent.errors import ConfigError
from bigtent.nix.keys import load_secret_key
from bigtent.runner.auth.oidc import OidcVerifier
from bigtent.runner.auth.ratelimit import AuthFailureLimiter, FailureThrottle
from bigtent.runner.auth.tokens import TokenRegistry, TokenStore
from bigtent.runner.cache import Cache, Upstreams
from bigtent.runner.db.migrate import check_schema, create_engine
from bigtent.runner.db.notify import Change, ChangeFeed, make_feed
from bigtent.runner.logs import LogStore
from bigtent.runner.scheduler.dispatcher import Scheduler
from bigtent.runner.sessions import Sessions
from bigtent.runner.sshvenue import SshBuilders
from bigtent.runner.storage import LocalStorage

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
    oidc: OidcVerifier | None = None
    """Verifies agents' OIDC ID tokens; None when no ``[[auth.oidc]]`` issuer is configured."""
    feed: ChangeFeed | None = None
    """What other runners on the same database change (PostgreSQL: LISTEN/NOTIFY)."""

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
    tokens = TokenRegistry.from_config(config.auth.tokens)
    # Built before anything that needs closing: its only failure is a bad ca_file.
    oidc = OidcVerifier(config.auth.oidc) if config.auth.oidc else None
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
    cache = Cache(
        engine, LocalStorage(state_dir / "cache"), key, config.cache, config.runner.base_url()
    )
    upstreams = Upstreams(
        config.cache.upstreams,
        config.cache.upstream_max_in_flight,
        config.cache.upstream_timeout_secs,
    )
    logs = LogStore(state_dir / "logs", config.scheduler.max_log_bytes)
    scheduler = Scheduler(engine, config.scheduler, logs, cache.present, feed=feed)
    await scheduler.load()
    sessions = Sessions(
        config, engine, scheduler, tokens, cache.url, cache.public_key, auth_throttle, oidc
    )
    ssh = SshBuilders(config, scheduler, cache, upstreams)
    ssh.attach()
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
        oidc,
        feed,
    )


async def close_components(comps: Components) -> None:
    for session in list(comps.sessions.live.values()):
        session.close()
    await comps.ssh.aclose()
    await comps.upstreams.aclose()
    comps.logs.close_all()
    if comps.oidc is not None:
        await comps.oidc.aclose()
    await comps.engine.dispose()
