"""``bigtent nix-hook``: Nix's build hook, so plain ``nix-build``/``nix build`` build on the farm.

Nix starts the program named by its ``build-hook`` setting (with the verbosity appended) and
speaks to it in Nix's wire format (64-bit little-endian integers, padded strings) on stdin:

1. every setting of the parent (``1 NAME VALUE`` … ``0``), once per hook process;
2. for each derivation Nix would build: ``"try" AM_WILLING SYSTEM DRV_PATH [FEATURES]``. The
   hook answers on stderr with a line ``# accept`` (then a machine name line), ``# decline``
   (Nix builds it itself, if it may), ``# postpone`` or ``# decline-permanently``. Other lines
   before the answer are copied to Nix's stderr;
3. after ``# accept``: the input paths and the wanted output names (string lists); Nix then
   closes stdin. The outputs must be valid in the local store when the hook exits: exit 0 is
   success, 100 a build failure, 101 a timeout, anything else a miscellaneous failure.

Fd 4 is the build log (``nix build -L`` shows it, a failure shows its last lines); after the
answer, stderr carries only Nix's JSON log messages (``@nix {...}``), plain lines are dropped.
Nix holds the locks on the output paths while the hook runs: the outputs are copied in with
``nix copy`` and ``NIX_HELD_LOCKS`` naming them, which makes Nix's local store skip those locks
(without it the copy waits for them forever).

``hookentry`` reads the wire and answers (importing nothing heavy); this module holds the
options, the hand-over to the helper (``nixhelper``) and the farm's side, which reuses
``bigtent build``'s flow (``client/build.py``): upload what the runner lacks of the ``.drv``
closure, submit, follow, and take the outputs from the runner's signed cache, whose signature
the local Nix checks. The decisions are pure functions.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence, Set
from enum import StrEnum
from typing import IO, TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from bigtent.client.hookentry import (
    HookError,
    TryRequest,
    WireReader,
    answer,
    encode_request,
    farm_systems,
    is_private_dir,
    local_store_uri,
    read_settings,
    relay,
    socket_path,
)

if TYPE_CHECKING:
    import asyncio

    from bigtent.client.api import Build, RunnerClient, RunnerStatus, Step, StepAttempt, WaitingStep
    from bigtent.client.progress import PrefixedLines
    from bigtent.nix.store import NixStore

# The farm's side imports asyncio, httpx and the client inside its functions: ``run_hook``
# (the full path, for ``--on-unreachable local`` and the tests) answers before it needs them.

_T = TypeVar("_T")
log = logging.getLogger(__name__)

LOG_FD = 4
"""Nix reads the build log of a hook from this descriptor."""
PROBE_TIMEOUT_SECS = 5.0
"""How long the first request to the runner may take before the hook gives up on it."""


class OnUnreachable(StrEnum):
    """What the hook does when the runner cannot be reached or refuses the credential."""

    FAIL = "fail"
    """The derivation fails with a message saying why (the default)."""
    LOCAL = "local"
    """Decline every derivation, so Nix builds them itself (when its ``max-jobs`` allows)."""


def json_message(text: str, level: int = 0) -> bytes:
    """A message Nix prints from the hook's stderr after the answer (level 0: an error)."""
    import json

    return b"@nix " + json.dumps({"action": "msg", "level": level, "msg": text}).encode() + b"\n"


# ---- decisions (pure) -------------------------------------------------------------------------


class HookConfig(NamedTuple):
    runner_url: str
    token: str | None = None
    """A client token; None when ``oidc_audience`` is set or the runner has no auth."""
    oidc_audience: str | None = None
    """Ask the CI job (GitHub Actions) for an ID token with this audience instead of a token."""
    ca_file: str | None = None
    systems: frozenset[str] = frozenset()
    """Systems sent to the farm; empty: the local Nix's ``system`` and ``extra-platforms``."""
    on_unreachable: OnUnreachable = OnUnreachable.FAIL
    poll_interval_secs: float = 0.1
    unreachable_grace_secs: float = 10.0
    """How long a runner that stopped answering part way through is waited for."""
    public_keys: tuple[str, ...] = ()
    """Trust only these keys for the outputs (``--public-key``); empty: the keys the runner
    names in ``GET /api/v1/status``."""
    helper: bool = True
    """Hand each accepted derivation to the helper process (started on first use) instead of
    doing the farm's side in this short-lived process."""
    socket: str | None = None
    """The helper's socket; None: one per runner and credential in a private directory."""
    helper_idle_secs: float = 60.0


def failure_exit_code(build: Build) -> int:
    """Nix's meaning of the hook's exit: 101 a timeout, 100 a build failure (the builder
    failed, or the farm remembers it failing), 1 anything else (infrastructure, capacity)."""
    outcomes = {step.outcome for step in build.failed_steps}
    if "timed_out" in outcomes:
        return 101
    if outcomes & {"build_failure", "log_limit"}:
        return 100
    return 1


# ---- the farm side ----------------------------------------------------------------------------


class Sink(Protocol):
    """Where the farm side reports: the build log, and errors Nix prints at once."""

    def line(self, text: str) -> None: ...

    def error(self, text: str) -> None: ...


class LogSink:
    """The build log Nix shows (fd 4), and Nix's error messages (stderr, JSON)."""

    def __init__(self, log: IO[bytes], messages: IO[bytes]) -> None:
        self.log = log
        self.messages = messages

    def line(self, text: str) -> None:
        for piece in text.splitlines() or [""]:
            self.log.write(piece.encode(errors="replace") + b"\n")
        self.log.flush()

    def error(self, text: str) -> None:
        """An error Nix prints at once, and in the log so a failure's tail shows it."""
        self.line(f"bigtent: {text}")
        self.messages.write(json_message(f"bigtent: {text}"))
        self.messages.flush()


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
        from bigtent.client.build import attempt_notice

        notice = attempt_notice(attempt)
        if notice is not None:
            self.sink.line(f"bigtent: {notice}")

    def on_waiting_for_capacity(self, steps: Sequence[WaitingStep]) -> None:
        from bigtent.client.build import waiting_line

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

    from bigtent.client.build import (
        AttemptFollower,
        BuildOptions,
        build_succeeded,
        follow_build,
        submit_build,
    )
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
        build = await submit_build(
            client, [drv_path], BuildOptions(out_link=None), observer, config.unreachable_grace_secs
        )
        phases.mark("submit")
        sink.line(f"bigtent: build {build.id} on {client.base_url}")
        logs = RootLogs(client, sink)
        logs.start(build)
        # One request per look, not two: retries show in the failed step's record. The end of
        # the step's log stream starts the next look early.
        build = await follow_build(
            client,
            build.id,
            observer,
            config.poll_interval_secs,
            config.unreachable_grace_secs,
            attempts=AttemptFollower(build.id, supported=False),
            pause=logs.pause,
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


LOG_END_WAIT_SECS = 5.0
"""How long the rest of a step's log may take once the build ended."""


class PhaseClock:
    """Where a derivation's time went in the helper (logged: architecture §"Plain nix-build
    on the farm", docs/benchmarks.md)."""

    def __init__(self) -> None:
        import time

        self._clock = time.monotonic
        self._last = self._clock()
        self.spans: list[tuple[str, float]] = []

    def mark(self, phase: str) -> None:
        now = self._clock()
        self.spans.append((phase, now - self._last))
        self._last = now

    def summary(self) -> str:
        return ", ".join(f"{name} {secs:.3f} s" for name, secs in self.spans)


class RootLogs:
    """The live log of the build's root steps, line by line to the sink (Nix's fd 4) while
    they run, from the runner's log stream (``GET /api/v1/steps/{id}/events``, as
    ``bigtent build -L``). A step whose stream fails (an older runner, an outage past the
    grace) has its log fetched whole once the build ended."""

    def __init__(self, client: RunnerClient, sink: Sink) -> None:
        self.client = client
        self.sink = sink
        self.tasks: dict[str, asyncio.Task[bool]] = {}
        self.streamed: set[str] = set()
        """Steps whose whole log reached the sink."""
        self.unstreamable: set[str] = set()
        """Steps whose stream failed (an older runner, an outage): fetched whole."""
        self.offsets: dict[str, int] = {}
        """The log offset each step's stream reached."""
        self.lines: dict[str, PrefixedLines] = {}
        self.cached = False

    def start(self, build: Build) -> None:
        import asyncio

        for root in build.roots:
            if root.step_id is None:
                self.cached = True
            elif root.step_id not in self.tasks:
                self.tasks[root.step_id] = asyncio.get_running_loop().create_task(
                    self._follow(root.step_id), name=f"hook-log-{root.step_id}"
                )

    async def _follow(self, step_id: str, start: int = 0) -> bool:
        from bigtent.client.progress import PrefixedLines, follow_step_log
        from bigtent.errors import BigtentError

        lines = self.lines.setdefault(step_id, PrefixedLines(""))

        def text(piece: str) -> None:
            for line in lines.feed(piece):
                self.sink.line(line)

        def reset() -> None:
            for line in lines.flush():
                self.sink.line(line)
            self.sink.line("bigtent: the step's log started again (another attempt)")

        def reached(offset: int) -> None:
            self.offsets[step_id] = offset

        try:
            await follow_step_log(
                self.client, step_id, text, start=start, on_reset=reset, on_offset=reached
            )
        except BigtentError as exc:
            log.info("no live log of step %s: %s", step_id, exc)
            self.unstreamable.add(step_id)
            self.sink.line(f"bigtent: the live log stopped ({exc}); the whole log follows")
            return False
        self.streamed.add(step_id)
        return True

    async def pause(self, interval_secs: float) -> None:
        """``follow_build``'s wait between looks: ``interval_secs``, or less when a step's
        log stream ends first (its end is a hint, not the signal: the runner may send it
        late when the step ended as the stream began)."""
        import asyncio

        running = [t for t in self.tasks.values() if not t.done()]
        if running:
            await asyncio.wait(running, timeout=interval_secs)
        else:
            await asyncio.sleep(interval_secs)

    async def finish(self, build: Build) -> None:
        """Once the build ended, its steps have: the streams still open are closed and the
        rest of each log is asked for from the offset reached (a final step's stream sends
        it and ends at once); a log that did not stream is fetched whole. Says so when the
        farm had built it already."""
        import asyncio

        from bigtent.client.build import build_succeeded
        from bigtent.errors import BigtentError

        await self.stop()
        rest = [
            asyncio.wait_for(self._follow(step_id, self.offsets.get(step_id, 0)), LOG_END_WAIT_SECS)
            for step_id in self.tasks
            if step_id not in self.streamed and step_id not in self.unstreamable
        ]
        for result in await asyncio.gather(*rest, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, TimeoutError):
                log.info("the rest of a step's log: %s", result)
        for lines in self.lines.values():
            for line in lines.flush():
                self.sink.line(line)
        if self.cached:
            self.sink.line("bigtent: the farm had built it already")
        if not build_succeeded(build):
            return  # ``_show_failure`` fetches the failed steps' logs
        for step_id in self.tasks:
            if step_id in self.streamed:
                continue
            if step_id not in self.unstreamable and self.offsets.get(step_id):
                # Part of it streamed, the rest did not come in time: no second copy.
                self.sink.line(f"bigtent: the rest of step {step_id}'s log did not come")
                continue
            try:
                self.sink.line((await self.client.fetch_log(step_id)).rstrip("\n"))
            except BigtentError as exc:
                self.sink.line(f"bigtent: no log of step {step_id}: {exc}")
            self.streamed.add(step_id)

    async def stop(self) -> None:
        import asyncio
        import contextlib

        for task in self.tasks.values():
            if not task.done():
                task.cancel()
        for task in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


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
    from bigtent.client.build import upload_closure
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
    client: RunnerClient, build: Build, sink: Sink, *, streamed: Set[str] = frozenset()
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

    from bigtent.client.build import substituter_options
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


# ---- the loop ---------------------------------------------------------------------------------


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    import asyncio

    return asyncio.run(coro)


def run_hook(
    config: HookConfig,
    stdin: IO[bytes],
    stderr: IO[bytes],
    log: IO[bytes],
) -> int:
    """Answer Nix's ``try``s until one is accepted (then build it and return its status) or
    Nix has no more (0). Nix starts a new hook for the next derivation after an accept.
    (``hookentry.main`` is the same without importing this module before the answer.)"""
    wire = WireReader(stdin)
    sink = LogSink(log, stderr)
    verdict: list[bool] = []  # the probe's, asked once per hook process

    def runner_ok(request: TryRequest) -> bool | None:
        if config.on_unreachable is not OnUnreachable.LOCAL:
            return None
        if not verdict:
            why = _run(probe_runner(config, request.drv_path))
            verdict.append(why is None)
            if why is not None:
                stderr.write(
                    f"bigtent: {why}; Nix builds locally (on-unreachable = local)\n".encode()
                )
        return verdict[0]

    try:
        settings = read_settings(wire)
        accepted = answer(wire, stderr, farm_systems(config.systems, settings), runner_ok)
    except (EOFError, HookError, UnicodeDecodeError) as exc:
        sink.error(f"cannot read Nix's request: {exc}")
        return 1
    if accepted is None:
        return 0
    request, wanted = accepted
    return build_accepted(config, settings, request.drv_path, wanted, sink)


def build_accepted(
    config: HookConfig,
    settings: Mapping[str, str],
    drv_path: str,
    wanted: Sequence[str],
    sink: Sink,
) -> int:
    """The farm's side of an accepted derivation: through the helper, or in this process."""
    store_uri = local_store_uri(settings)
    if not config.helper:
        return _run(build_on_farm(config, store_uri, drv_path, wanted, sink))
    return via_helper(config, store_uri, drv_path, wanted, sink)


def after_accept(
    argv: Sequence[str],
    settings: Mapping[str, str],
    drv_path: str,
    wanted: Sequence[str],
    stderr: IO[bytes],
) -> int:
    """``hookentry.main`` after ``# accept``: check the whole command line, then build."""
    sink = LogSink(open_log(), stderr)
    try:
        config = parse_args(argv, os.environ)
    except ValueError as exc:
        sink.error(f"bigtent-nix-hook: {exc}")
        return 1
    return build_accepted(config, settings, drv_path, wanted, sink)


# ---- the helper, seen from the hook ----------------------------------------------------------

HELPER_START_SECS = 15.0
"""How long a hook waits for the helper it started to listen."""


def helper_socket(config: HookConfig, uid: int, env: Mapping[str, str]) -> str:
    """The helper's socket: ``--socket``, else one per runner and credential in
    ``$XDG_RUNTIME_DIR``, ``/run/bigtent-nix-hook`` for root, or ``/tmp/bigtent-nix-hook-UID``
    (a directory only this user may enter, checked by ``private_dir`` before the hook
    connects: a helper listening there is this user's own)."""
    if config.socket:
        return config.socket
    return socket_path(
        config.runner_url, config.token or "", config.oidc_audience or "", config.ca_file or "",
        uid, env,
    )  # fmt: skip


def private_dir(path: str) -> None:
    """Create ``path`` (mode 0700) or check that it is this user's and closed to others."""
    import contextlib

    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    if not is_private_dir(path):
        raise OSError(f"{path} must be a directory of uid {os.getuid()} closed to others")


def via_helper(
    config: HookConfig, store_uri: str, drv_path: str, wanted: Sequence[str], sink: Sink
) -> int:
    """Hand the derivation to the helper (starting it when none listens) and relay what it
    says: log lines, errors, then the exit status."""
    import socket
    import time

    path = helper_socket(config, os.getuid(), os.environ)
    if not config.socket:
        try:  # before connecting: whoever owns the directory could serve a fake helper
            private_dir(os.path.dirname(path))
        except OSError as err:
            sink.error(f"cannot use the helper at {path}: {err}")
            return 1
    deadline: float | None = None
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            conn.close()
            if deadline is None:
                try:
                    start_helper(config, path)
                except OSError as err:
                    sink.error(f"cannot start the helper at {path}: {err}")
                    return 1
                deadline = time.monotonic() + HELPER_START_SECS
            elif time.monotonic() > deadline:
                sink.error(f"the helper at {path} did not start listening: {exc}")
                return 1
            time.sleep(0.02)
    with conn:
        code = relay(conn, encode_request(drv_path, wanted, store_uri), sink.line, sink.error)
    if code is not None:
        return code
    sink.error(f"the helper at {path} stopped before {drv_path} was built")
    return 1


def start_helper(config: HookConfig, path: str) -> None:
    """Start the helper in its own session, detached from Nix's pipes (Nix waits for the
    hook's stderr and log to close); it exits after ``helper_idle_secs`` without work."""
    import subprocess

    if not config.socket:
        private_dir(os.path.dirname(path))
    argv = [sys.executable, "-m", "bigtent.client.nixhelper", *helper_argv(config), path]
    # The token goes in the environment, never on a command line others can read.
    env = {k: v for k, v in os.environ.items() if k != "BIGTENT_TOKEN"}
    if config.token:
        env["BIGTENT_TOKEN"] = config.token
    with open(path + ".log", "ab") as log:
        subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )


def helper_argv(config: HookConfig) -> list[str]:
    """The options the helper is started with (its token comes by the environment)."""
    argv = ["--runner", config.runner_url, "--on-unreachable", config.on_unreachable.value]
    argv += ["--poll-interval", str(config.poll_interval_secs)]
    argv += ["--helper-idle", str(config.helper_idle_secs)]
    if config.ca_file:
        argv += ["--ca-file", config.ca_file]
    if config.oidc_audience:
        argv += ["--oidc", "github", "--audience", config.oidc_audience]
    for system in sorted(config.systems):
        argv += ["--system", system]
    for key in config.public_keys:
        argv += ["--public-key", key]
    argv.append("--socket")
    return argv


def open_log() -> IO[bytes]:
    """Fd 4 when Nix gave one, else stderr (the hook run by hand)."""
    try:
        os.fstat(LOG_FD)
    except OSError:
        return sys.stderr.buffer
    return os.fdopen(LOG_FD, "wb", buffering=0, closefd=False)


# ---- the command ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str], env: Mapping[str, str]) -> HookConfig:
    """``bigtent-nix-hook [OPTIONS] [VERBOSITY]`` (Nix appends its verbosity). Raises
    ``ValueError`` with a message for a usage mistake."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="bigtent-nix-hook",
        description="Nix's build hook: build derivations on a bigtent farm "
        "(nix.conf: build-hook = /path/to/bigtent-nix-hook --runner URL --token-file FILE).",
        exit_on_error=False,
    )
    parser.add_argument("--runner", default=env.get("BIGTENT_URL", "http://127.0.0.1:8470"))
    parser.add_argument("--token-file")
    parser.add_argument("--oidc", choices=["github"])
    parser.add_argument("--audience")
    parser.add_argument("--ca-file", default=env.get("BIGTENT_CA_FILE") or None)
    parser.add_argument("--system", action="append", default=[])
    parser.add_argument(
        "--on-unreachable", choices=[m.value for m in OnUnreachable], default="fail"
    )
    parser.add_argument("--poll-interval", type=float, default=0.1)
    parser.add_argument("--public-key", action="append", default=[])
    parser.add_argument("--socket")
    parser.add_argument("--no-helper", action="store_true")
    parser.add_argument("--helper-idle", type=float, default=60.0)
    parser.add_argument("verbosity", nargs="?", type=int, default=0)
    try:
        args = parser.parse_args(list(argv))
    except argparse.ArgumentError as exc:
        raise ValueError(f"bad arguments {' '.join(argv)!r}: {exc}") from None
    except SystemExit as exc:
        if exc.code == 0:  # --help
            raise
        raise ValueError(f"bad arguments {' '.join(argv)!r}") from None
    token: str | None = None
    audience: str | None = None
    if args.oidc is not None:
        if args.token_file is not None:
            raise ValueError("give --token-file or --oidc, not both")
        audience = args.audience or env.get("BIGTENT_AUDIENCE")
        if not audience:
            raise ValueError("--oidc github needs --audience (the runner's [[auth.oidc]])")
    elif args.token_file is not None:
        from bigtent.errors import ConfigError
        from bigtent.secretfile import read_secret_file

        try:
            token = read_secret_file(args.token_file, "token file")
        except ConfigError as exc:
            raise ValueError(exc.message) from None
    else:
        token = env.get("BIGTENT_TOKEN") or None
    if args.poll_interval <= 0:
        raise ValueError("--poll-interval must be positive")
    return HookConfig(
        runner_url=args.runner,
        token=token,
        oidc_audience=audience,
        ca_file=args.ca_file,
        systems=frozenset(args.system),
        on_unreachable=OnUnreachable(args.on_unreachable),
        poll_interval_secs=args.poll_interval,
        public_keys=tuple(args.public_key),
        helper=not args.no_helper,
        socket=args.socket,
        helper_idle_secs=args.helper_idle,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bigtent-nix-hook`` (and ``bigtent nix-hook``)."""
    stderr = sys.stderr.buffer
    log = open_log()
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv, os.environ)
    except ValueError as exc:
        # Before any answer Nix copies plain lines to its stderr; after one it wants JSON.
        stderr.write(f"bigtent-nix-hook: {exc}\n".encode())
        stderr.flush()
        return 1
    try:
        return run_hook(config, sys.stdin.buffer, stderr, log)
    except KeyboardInterrupt:
        return 1
