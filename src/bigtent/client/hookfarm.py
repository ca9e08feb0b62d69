"""The farm's side of the hook, which reuses ``bigtent build``'s flow (``client/build.py``):
upload what the runner lacks of the ``.drv`` closure, submit, follow, and copy the outputs
from the runner's signed cache, whose signature the local Nix checks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Sequence, Set
from typing import TYPE_CHECKING

from bigtent.client.hookcommon import PROBE_TIMEOUT_SECS, HookConfig, Sink
from bigtent.client.hooklogs import PhaseClock, RootLogs, build_and_follow

if TYPE_CHECKING:
    from bigtent.apimodels import Build, RunnerStatus, Step, StepAttempt, WaitingStep
    from bigtent.client.api import RunnerClient
    from bigtent.nix.store import NixStore

log = logging.getLogger(__name__)


def failure_exit_code(build: Build) -> int:
    """Nix's meaning of the hook's exit: 101 a timeout, 100 a build failure (the builder
    failed, or the farm remembers it failing), 1 anything else (infrastructure, capacity)."""
    outcomes = {step.outcome for step in build.failed_steps}
    if "timed_out" in outcomes:
        return 101
    if outcomes & {"build_failure", "log_limit"}:
        return 100
    return 1


class FarmMemory:
    """What a helper keeps between derivations."""

    def __init__(self) -> None:
        self.known: set[str] = set()
        """Store paths the runner's cache has (uploaded or seen: ``upload_drv``)."""
        self.status: RunnerStatus | None = None
        """The runner's cache URLs and keys, from the last copy that worked."""


class _HookObserver:
    """``client/build.py``'s observer: phases go to the build log."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def on_phase(self, message: str) -> None:
        self.sink.line(f"bigtent: {message}")

    def on_upload(self, done: int, total: int) -> None:
        pass

    def on_progress(self, build: Build) -> None:
        pass

    def on_steps(self, steps: Sequence[Step]) -> None:
        pass

    def on_attempt(self, attempt: StepAttempt) -> None:
        from bigtent.client.reports import attempt_notice

        notice = attempt_notice(attempt)
        if notice is not None:
            self.sink.line(f"bigtent: {notice}")

    def on_waiting_for_capacity(self, steps: Sequence[WaitingStep]) -> None:
        from bigtent.client.reports import waiting_line

        for step in steps:
            self.sink.line(f"bigtent: {waiting_line(step)}")


async def _credential(config: HookConfig) -> str | None:
    if config.oidc_audience is None:
        return config.token
    from bigtent.agent.credentials import github_actions_token

    source = github_actions_token(os.environ, config.oidc_audience)
    return await source.credential(fresh=True)


async def runner_client(config: HookConfig) -> RunnerClient:
    from pathlib import Path

    from bigtent.client.api import RunnerClient

    ca_file = Path(config.ca_file) if config.ca_file else None
    return RunnerClient(config.runner_url, token=await _credential(config), ca_file=ca_file)


async def probe_runner(config: HookConfig, drv_path: str) -> str | None:
    """None when the runner answers a client request with this credential, else why not."""
    import asyncio

    from bigtent.errors import BigtentError

    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECS):
            async with await runner_client(config) as client:
                await client.missing_paths([drv_path])
    except TimeoutError:
        return f"runner at {config.runner_url} did not answer within {PROBE_TIMEOUT_SECS:.0f} s"
    except BigtentError as exc:
        return str(exc)
    return None


async def build_on_farm(
    config: HookConfig,
    store_uri: str,
    drv_path: str,
    wanted: Sequence[str],
    sink: Sink,
    client: RunnerClient | None = None,
    memory: FarmMemory | None = None,
) -> int:
    """Build ``drv_path`` on the farm and copy its wanted outputs into the local store
    ``store_uri``; return the hook's exit status. ``client``: a client to reuse (the helper's),
    else one is made for this build; ``memory``: what the helper learnt from earlier builds."""
    from bigtent.errors import BigtentError
    from bigtent.nix.store import NixStore

    store = NixStore(store_uri)
    observer = _HookObserver(sink)
    memory = FarmMemory() if memory is None else memory
    if client is not None:
        return await _build(config, client, store, drv_path, wanted, sink, observer, memory)
    try:
        own = await runner_client(config)
    except BigtentError as exc:
        sink.error(f"cannot build {drv_path} on the farm: {exc}")
        return 1
    try:
        return await _build(config, own, store, drv_path, wanted, sink, observer, memory)
    finally:
        await own.aclose()


async def _build(
    config: HookConfig,
    client: RunnerClient,
    store: NixStore,
    drv_path: str,
    wanted: Sequence[str],
    sink: Sink,
    observer: _HookObserver,
    memory: FarmMemory,
) -> int:
    import asyncio

    from bigtent.client.reports import build_succeeded
    from bigtent.errors import BigtentError

    try:
        # Fails fast on a refused credential or a runner that is not there.
        async with asyncio.timeout(PROBE_TIMEOUT_SECS):
            missing = await client.missing_paths([drv_path])
    except TimeoutError:
        sink.error(
            f"runner at {config.runner_url} did not answer within {PROBE_TIMEOUT_SECS:.0f} s"
        )
        return 1
    except BigtentError as exc:
        sink.error(f"cannot build {drv_path} on the farm: {exc}")
        return 1
    phases = PhaseClock()
    logs: RootLogs | None = None
    try:
        await upload_drv(client, store, drv_path, bool(missing), memory.known, observer)
        phases.mark("upload")
        logs = RootLogs(client, sink)
        build = await build_and_follow(
            client,
            [drv_path],
            observer,
            logs,
            phases,
            poll_interval_secs=config.poll_interval_secs,
            unreachable_grace_secs=config.unreachable_grace_secs,
        )
        phases.mark("build")
        if not build_succeeded(build):
            await logs.finish(build)
            await _show_failure(client, build, sink, streamed=logs.streamed)
            return failure_exit_code(build)
        await asyncio.gather(
            logs.finish(build),
            copy_outputs(client, store, build, wanted, memory, config.public_keys),
        )
        phases.mark("copy")
        log.info("%s: %s", drv_path.rsplit("/", 1)[-1], phases.summary())
        return 0
    except BigtentError as exc:
        sink.error(f"building {drv_path} on the farm failed: {exc}")
        return 1
    finally:
        if logs is not None:
            await logs.stop()


async def upload_drv(
    client: RunnerClient,
    store: NixStore,
    drv_path: str,
    missing: bool,
    known: set[str],
    observer: _HookObserver,
) -> None:
    """Make sure the runner has ``drv_path`` and its closure. ``missing``: the runner said it
    lacks the .drv. When every reference of the .drv is in ``known`` (this helper uploaded or
    saw them: Nix builds the inputs first), only the .drv itself is uploaded, hashed here
    from its file; else ``bigtent build``'s ``upload_closure`` (one ``nix path-info`` of the
    whole closure, then only what the runner lacks)."""
    from bigtent.client.upload import upload_closure
    from bigtent.nix import base32
    from bigtent.nix.drv import DrvError, parse_drv
    from bigtent.nix.nar import dump_path

    real = store.real_path(drv_path)
    try:
        drv = parse_drv(real.read_text())
    except (OSError, UnicodeDecodeError, DrvError):
        drv = None
    if drv is not None and all(ref in known for ref in drv.references):
        if missing:
            import hashlib

            nar = b"".join(dump_path(real))

            async def body() -> AsyncIterator[bytes]:
                yield nar

            await client.upload_path(
                drv_path,
                body(),
                nar_hash=base32.format_hash("sha256", hashlib.sha256(nar).digest()),
                nar_size=len(nar),
                references=[ref.rsplit("/", 1)[-1] for ref in drv.references],
            )
        known.add(drv_path)
        return
    if missing:
        await upload_closure(client, store, [drv_path], observer)
    known.add(drv_path)
    if drv is not None:
        known.update(drv.references)


async def _show_failure(
    client: RunnerClient, build: Build, sink: Sink, *, streamed: Set[int] = frozenset()
) -> None:
    """Each failed step and its log (a step in ``streamed`` has shown its log already)."""
    from bigtent.errors import BigtentError

    for step in build.failed_steps:
        what = ": ".join(x for x in (step.outcome or step.state, step.error) if x)
        sink.line(f"bigtent: step {step.id} {step.drv_path} failed on the farm: {what}")
        if step.id in streamed:
            continue
        try:
            text = await client.fetch_log(step.id)
        except BigtentError:
            text = step.log_tail or ""
        if text:
            sink.line(text.rstrip("\n"))
    if not build.failed_steps:
        sink.line(f"bigtent: build {build.id} ended {build.state.value}")


def wanted_paths(build: Build, wanted: Sequence[str]) -> list[str]:
    """The output paths Nix asked for (all outputs when it named none)."""
    paths: list[str] = []
    for root in build.roots:
        for name, path in sorted(root.outputs.items()):
            if not wanted or name in wanted:
                paths.append(path)
    return list(dict.fromkeys(paths))


async def copy_outputs(
    client: RunnerClient,
    store: NixStore,
    build: Build,
    wanted: Sequence[str],
    memory: FarmMemory,
    public_keys: Sequence[str] = (),
) -> None:
    """Copy the outputs from the runner's cache (then its upstreams) into the local store,
    signatures checked by Nix against the runner's key (``bigtent build``'s substituter
    options), or only against ``public_keys`` when those are given."""
    import tempfile

    from bigtent.client.outputs import substituter_options
    from bigtent.errors import NixError

    paths = wanted_paths(build, wanted)
    if not paths:
        return
    status = memory.status or await client.fetch_status()
    options = substituter_options(status, client.base_url, untrusted=not build.trusted)
    sources = options.pop("substituters").split()
    if public_keys:
        options["trusted-public-keys"] = " ".join(public_keys)
    failure: NixError | None = None
    for source in sources:
        try:
            # Its own narinfo cache: Nix 2.8's binary-cache-v6.sqlite fails inserts ("constraint
            # failed") when several nix copy processes fill it at once (seen in the tests).
            with tempfile.TemporaryDirectory(prefix="bigtent-nix-copy-") as cache_home:
                await store.copy_from(
                    source,
                    paths,
                    options=options,
                    held_locks=paths,
                    env={"XDG_CACHE_HOME": cache_home},
                )
            memory.status = status
            return
        except NixError as exc:
            failure = exc
    memory.status = None  # the runner's caches or keys may have changed: ask again next time
    assert failure is not None
    raise NixError(
        f"copying the outputs from the runner's cache failed: {failure}",
        argv=failure.argv,
        status=failure.status,
        stderr=failure.stderr,
    )
