"""The agent process: check the store can build, find who it is, wire the executor, the store
collector and the session together, and run until drained, stopped or refused
(``run_agent``, what ``bigtent agent`` runs)."""

from __future__ import annotations

import contextlib
import logging
import ssl

import httpx

from bigtent.agent import limits as lim
from bigtent.agent.connection import Connector, websocket_connector
from bigtent.agent.credentials import CredentialSource
from bigtent.agent.executor import Executor
from bigtent.agent.identity import AgentIdentity, ephemeral_identity, persistent_identity
from bigtent.agent.probe import run_probe
from bigtent.agent.session import AgentSession
from bigtent.agent.signals import shutdown_signals
from bigtent.agent.stepstore import CacheSettings, step_store
from bigtent.config import AgentConfig, AgentSection
from bigtent.errors import AgentCannotBuild, ConfigError
from bigtent.nix.store import NixStore
from bigtent.storebudget import (
    StepRoots,
    StoreBudget,
    StoreCollector,
    free_disk_bytes,
    gc_roots_dir,
)
from bigtent.tlsctx import ca_context

log = logging.getLogger(__name__)

EXIT_CANNOT_BUILD = AgentCannotBuild.exit_code
"""The start-up probe failed (raised as ``AgentCannotBuild``; the CLI exits with it: 6)."""
PROBE_CACHE_DIR = "probe"
"""``WORK/xdg-cache/probe``: the start-up probe's ``XDG_CACHE_HOME``."""


def ssl_context_for(section: AgentSection) -> ssl.SSLContext | None:
    """TLS settings for wss/https: ``ca_file`` when given, else the system roots; plus the
    agent's client certificate for mTLS when ``client_cert_file`` is set."""
    if section.client_key_file is not None and section.client_cert_file is None:
        raise ConfigError("config key agent.client_key_file needs agent.client_cert_file")
    if section.ca_file is None and section.client_cert_file is None:
        return None
    ctx = ca_context(section.ca_file, "agent.ca_file")
    if section.client_cert_file is not None:
        key = section.client_key_file
        try:
            ctx.load_cert_chain(str(section.client_cert_file), str(key) if key else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"config key agent.client_cert_file: cannot load {section.client_cert_file}"
                f"{f' with {key}' if key else ''}: {exc}"
            ) from exc
    return ctx


def store_collector(section: AgentSection, executor: Executor) -> StoreCollector | None:
    """The agent's store collector when ``min_free_bytes`` is set (None otherwise); running
    steps' paths are rooted from here on. Raises ConfigError when the roots cannot be kept."""
    budget = StoreBudget(section.min_free_bytes, section.target_free_bytes)
    if not budget.enabled:
        return None
    roots = StepRoots(gc_roots_dir(section.store, section.work_dir))
    try:
        roots.reset()
    except OSError as exc:
        raise ConfigError(
            f"min_free_bytes is set, but this agent cannot keep GC roots in "
            f"{roots.directory} ({exc.strerror or exc}): run it as the store's owner, or "
            "set min_free_bytes = 0"
        ) from exc
    executor.roots = roots
    store = NixStore(store=section.store)
    store_dir = store.real_path("/nix/store")
    log.info(
        "store budget: collect below %d bytes free, up to %d bytes free (roots in %s)",
        budget.min_free_bytes,
        budget.target,
        roots.directory,
    )
    return StoreCollector(
        store,
        budget,
        free_bytes=lambda: free_disk_bytes(store_dir),
        release_idle=executor.release_idle,
    )


async def run_agent(
    cfg: AgentConfig,
    token: str | CredentialSource | None,
    *,
    connect: Connector | None = None,
    http: httpx.AsyncClient | None = None,
    identity: AgentIdentity | None = None,
    install_signal_handlers: bool = True,
) -> int:
    """Run an agent until it is drained, stopped or its session fails; returns the exit status.

    Persistent: 0 after a drain (runner ``drain`` or SIGTERM) or a forced stop (second
    SIGTERM), 3 when the runner refuses the credentials; otherwise it reconnects forever.
    Ephemeral (``[agent.ephemeral]``, architecture §4): one session with a fresh identity; 0 when a
    limit or a drain ended it, 3 (credentials refused), 4 (runner unreachable or the session
    dropped) or 1 (protocol error) when the session failed. Startup problems (work dir, Nix
    missing) raise ``BigtentError`` for the CLI to report. ``connect``/``http``/``identity``
    are seams for tests.
    """
    section = cfg.agent
    limits = None if section.ephemeral is None else lim.Limits.from_section(section.ephemeral)
    ssl_context = ssl_context_for(section)
    if section.probe:
        # Before registering: an agent that cannot build never takes work (AgentCannotBuild).
        await run_probe(step_store(section, CacheSettings("", ""), PROBE_CACHE_DIR))
    else:
        log.warning("start-up probe skipped (agent.probe = false)")
    if identity is None:
        store = NixStore(store=section.store)
        if limits is not None:
            identity = await ephemeral_identity(section, store)
        else:
            identity = await persistent_identity(section, store)
    async with contextlib.AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(
                httpx.AsyncClient(
                    verify=ssl_context if ssl_context is not None else True,
                    timeout=httpx.Timeout(300.0, connect=10.0),
                )
            )
        executor = Executor(section, http=http, token=token, ssl_context=ssl_context)
        stack.push_async_callback(executor.aclose)
        collector = store_collector(section, executor)
        session = AgentSession(
            section,
            identity,
            token=token,
            connect=connect or websocket_connector(ssl_context),
            executor=executor,
            limits=limits,
            collector=collector,
        )
        if install_signal_handlers:
            stack.enter_context(shutdown_signals(session.request_shutdown))
        log.info(
            "%s agent %s (machine %s) starting: systems %s, %d slot(s), runner %s",
            "ephemeral" if limits is not None else "persistent",
            identity.name,
            identity.machine_id,
            " ".join(identity.systems),
            section.max_jobs,
            section.runner_url,
        )
        return await session.run()
