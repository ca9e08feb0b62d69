"""The only module that spawns Nix: thin async wrappers over nix-store, nix-instantiate and nix.

Every command runs with the configured store (``--store``) and options, so one host can run
several agents with separate stores. Works with Nix 2.8 (Debian) and current releases.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from bigtent.errors import NixError
from bigtent.nix.sandbox import EvalSandbox, bwrap_argv, resolve_program, sandbox_env

log = logging.getLogger(__name__)

NIX_COMMAND = ("--extra-experimental-features", "nix-command")
_STDERR_TAIL_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class PathInfo:
    """What ``nix path-info --json`` says about one valid store path."""

    path: str
    nar_hash: str
    """As Nix printed it: SRI (``sha256-…``) on 2.8, ``sha256:<nix32>`` on some versions."""
    nar_size: int
    references: tuple[str, ...]
    deriver: str | None = None
    ca: str | None = None


class RealiseStatus(StrEnum):
    """How a ``nix-store --realise`` ended, classified from its exit status and our limits."""

    SUCCESS = "success"
    BUILD_FAILURE = "build_failure"
    TIMED_OUT = "timed_out"
    LOG_LIMIT = "log_limit"
    ABORTED = "aborted"
    OTHER_FAILURE = "other_failure"
    """Nix exited 1: typically inputs that could not be substituted or a store problem."""


@dataclass(slots=True)
class RealiseResult:
    status: RealiseStatus
    exit_code: int | None
    output_paths: list[str] = field(default_factory=list)
    error: str = ""
    log_bytes: int = 0


LineSink = Callable[[str], Awaitable[None] | None]


def classify_exit(code: int) -> RealiseStatus:
    """Map ``nix-store --realise`` exit codes (100 + bit mask: 1 timeout, 2 hash, 4 check)."""
    if code == 0:
        return RealiseStatus.SUCCESS
    if 100 <= code <= 107:
        return RealiseStatus.TIMED_OUT if (code - 100) & 1 else RealiseStatus.BUILD_FAILURE
    return RealiseStatus.OTHER_FAILURE


class NixStore:
    """Runs Nix commands against one store with fixed options.

    ``store`` is a store URI ("" for the default store); ``options`` become ``--option K V``.
    ``env`` is added to the process environment (e.g. ``XDG_CACHE_HOME``).
    """

    def __init__(
        self,
        store: str = "",
        options: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        bin_dir: str = "",
    ) -> None:
        self.store = store
        self.options = dict(options or {})
        self.env = dict(env or {})
        self.bin_dir = bin_dir

    # ---- plumbing -----------------------------------------------------------------------
    def _argv(self, tool: str, args: Sequence[str], extra: Mapping[str, str] | None) -> list[str]:
        argv = [os.path.join(self.bin_dir, tool) if self.bin_dir else tool]
        if tool == "nix":
            argv += NIX_COMMAND
        if self.store:
            argv += ["--store", self.store]
        for key, value in {**self.options, **(extra or {})}.items():
            argv += ["--option", key, value]
        argv += list(args)
        return argv

    def _environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    async def run(
        self,
        tool: str,
        args: Sequence[str],
        *,
        options: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Run a Nix command to completion and return its stdout; raise NixError on failure.
        ``env`` is added to this command's environment."""
        argv = self._argv(tool, args, options)
        log.debug("running %s", argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**self._environ(), **(env or {})},
            )
        except FileNotFoundError as exc:
            raise NixError(
                f"{argv[0]} not found: is Nix installed and on PATH?", argv=argv
            ) from exc
        out, err = await proc.communicate(stdin)
        if proc.returncode != 0:
            text = err.decode(errors="replace")
            raise NixError(
                f"{command_line(argv)} failed (exit {proc.returncode}): {last_error_line(text)}",
                argv=argv,
                status=proc.returncode,
                stderr=text,
            )
        return out.decode()

    async def evaluate(
        self, args: Sequence[str], *, features: Sequence[str] = ()
    ) -> tuple[str, str]:
        """``nix-instantiate ARGS`` (an evaluation): its stdout and its stderr (warnings,
        ``builtins.trace`` output). On failure a ``NixError`` carrying Nix's whole message
        (the error, its position and code frame, the trace with ``--show-trace``) and the
        command in full. ``features``: options before the arguments (e.g.
        ``--extra-experimental-features``)."""
        argv = self._argv("nix-instantiate", [*features, *args], None)
        log.debug("running %s", argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._environ(),
            )
        except FileNotFoundError as exc:
            raise NixError(
                f"{argv[0]} not found: is Nix installed and on PATH?", argv=argv
            ) from exc
        out, err = await proc.communicate()
        text = err.decode(errors="replace")
        if proc.returncode != 0:
            raise NixError(
                evaluation_failure(argv, proc.returncode, text),
                argv=argv,
                status=proc.returncode,
                stderr=text,
            )
        return out.decode(), text

    # ---- queries -------------------------------------------------------------------------
    async def current_system(self) -> str:
        out = await self.run("nix-instantiate", ["--eval", "--expr", "builtins.currentSystem"])
        return str(json.loads(out))

    async def instantiate(
        self, file: str | None, attrs: Sequence[str] = (), *, expr: str | None = None
    ) -> list[str]:
        """Instantiate a Nix file (or expression) to .drv paths, one per attribute."""
        args: list[str] = []
        if expr is not None:
            args += ["--expr", expr]
        elif file is not None:
            args.append(file)
        for attr in attrs:
            args += ["-A", attr]
        out = await self.run("nix-instantiate", args)
        return [line for line in out.splitlines() if line.startswith("/")]

    async def path_info(
        self, paths: Sequence[str], *, recursive: bool = False, derivation: bool = True
    ) -> list[PathInfo]:
        """Metadata of valid paths (``derivation``: a .drv means itself, not its outputs)."""
        if not paths:
            return []
        args = ["path-info", "--json"]
        if recursive:
            args.append("--recursive")
        if derivation:
            args.append("--derivation")
        out = await self.run("nix", [*args, *paths])
        data = json.loads(out)
        if isinstance(data, dict):  # newer Nix: {path: info}
            items = [{"path": k, **v} for k, v in data.items() if v is not None]
        else:
            items = [d for d in data if d.get("valid", True)]
        return [
            PathInfo(
                path=d["path"],
                nar_hash=d["narHash"],
                nar_size=int(d["narSize"]),
                references=tuple(d.get("references") or ()),
                deriver=d.get("deriver"),
                ca=d.get("ca"),
            )
            for d in items
        ]

    async def valid_paths(self, paths: Sequence[str]) -> set[str]:
        """The subset of ``paths`` that are valid in this store."""
        if not paths:
            return set()
        argv = self._argv("nix-store", ["--check-validity", "--print-invalid", *paths], None)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._environ(),
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise NixError(
                "nix-store --check-validity failed",
                argv=argv,
                status=proc.returncode,
                stderr=err.decode(errors="replace"),
            )
        invalid = set(out.decode().split())
        return {p for p in paths if p not in invalid}

    async def dump(self, path: str, chunk_size: int = 256 * 1024) -> AsyncIterator[bytes]:
        """Stream ``nix-store --dump PATH`` (for paths not readable from this filesystem)."""
        argv = self._argv("nix-store", ["--dump", path], None)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._environ(),
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            while chunk := await proc.stdout.read(chunk_size):
                yield chunk
            err = await proc.stderr.read()
            if await proc.wait() != 0:
                raise NixError(
                    f"nix-store --dump {path} failed",
                    argv=argv,
                    status=proc.returncode,
                    stderr=err.decode(errors="replace"),
                )
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def copy_from(
        self,
        source: str,
        paths: Sequence[str],
        *,
        options: Mapping[str, str] | None = None,
        held_locks: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``nix copy --from SOURCE PATHS`` into this store; Nix checks each path's signature
        against ``trusted-public-keys``. ``held_locks``: paths whose locks our parent Nix holds
        (a build hook copying the outputs of the derivation it was given); Nix's local store
        then does not wait for those locks (``NIX_HELD_LOCKS``). ``env``: more environment."""
        if not paths:
            return
        args = ["copy", "--from", source]
        if self.store:
            args += ["--to", self.store]
        extra = dict(env or {})
        if held_locks:
            extra["NIX_HELD_LOCKS"] = " ".join(held_locks)
        await self.run("nix", [*args, *paths], options=options, env=extra)

    async def delete(self, paths: Sequence[str]) -> None:
        """``nix-store --delete PATHS``: remove paths nothing refers to (raises NixError)."""
        if paths:
            await self.run("nix-store", ["--delete", *paths])

    def real_path(self, store_path: str) -> Path:
        """Where a store path lives on this filesystem (``local?root=DIR`` prefixes DIR)."""
        root = store_root(self.store)
        return Path(root + store_path) if root else Path(store_path)

    # ---- builds ---------------------------------------------------------------------------
    async def spawn_serve(self) -> tuple[asyncio.subprocess.Process, int]:
        """Start ``nix-store --serve --write`` (in its own process group, so that killing it
        kills its builds): stdin and stdout are asyncio pipes; stderr is a plain pipe whose
        read end is returned for the caller to read (see ``bigtent.nix.serve``)."""
        argv = self._argv("nix-store", ["--serve", "--write"], None)
        log.debug("running %s", argv)
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=write_fd,
                env=self._environ(),
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            os.close(read_fd)
            raise NixError(f"{argv[0]} not found: is Nix installed?", argv=argv) from exc
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return proc, read_fd

    async def realise(
        self,
        paths: Sequence[str],
        *,
        on_line: LineSink | None = None,
        timeout_secs: float | None = None,
        max_silent_secs: float | None = None,
        max_log_bytes: int | None = None,
        options: Mapping[str, str] | None = None,
        add_root: str | None = None,
        abort: asyncio.Event | None = None,
    ) -> RealiseResult:
        """``nix-store --realise`` with the build log streamed line by line to ``on_line``.

        Nix enforces ``timeout``/``max-silent-time`` itself; we also kill the process group
        on a wall-clock backstop, on ``max_log_bytes`` of log, or when ``abort`` is set.
        """
        extra = dict(options or {})
        if timeout_secs is not None:
            extra.setdefault("timeout", str(int(max(1, timeout_secs))))
        if max_silent_secs is not None:
            extra.setdefault("max-silent-time", str(int(max(1, max_silent_secs))))
        args = ["--realise", *paths]
        if add_root:
            args += ["--add-root", add_root, "--indirect"]
        argv = self._argv("nix-store", args, extra)
        log.debug("running %s", argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._environ(),
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise NixError(f"{argv[0]} not found: is Nix installed?", argv=argv) from exc
        assert proc.stdout is not None and proc.stderr is not None
        stderr = proc.stderr
        tail = bytearray()
        log_bytes = 0
        killed: RealiseStatus | None = None

        async def pump_log() -> None:
            nonlocal log_bytes, killed
            while line := await stderr.readline():
                log_bytes += len(line)
                tail.extend(line)
                del tail[:-_STDERR_TAIL_BYTES]
                if max_log_bytes is not None and log_bytes > max_log_bytes:
                    killed = killed or RealiseStatus.LOG_LIMIT
                    _kill_group(proc)
                    return
                if on_line is not None:
                    res = on_line(line.decode(errors="replace").rstrip("\n"))
                    if res is not None:
                        await res

        started = time.monotonic()
        pump = asyncio.create_task(pump_log())
        out_task = asyncio.create_task(proc.stdout.read())
        waiters: set[asyncio.Future[object]] = {pump}  # type: ignore[arg-type]
        abort_task: asyncio.Task[bool] | None = None
        if abort is not None:
            abort_task = asyncio.create_task(abort.wait())
            waiters.add(abort_task)  # type: ignore[arg-type]
        try:
            while not pump.done():
                backstop = None
                if timeout_secs is not None:
                    backstop = max(0.0, timeout_secs + 30 - (time.monotonic() - started))
                done, _ = await asyncio.wait(
                    waiters, timeout=backstop, return_when=asyncio.FIRST_COMPLETED
                )
                if abort_task is not None and abort_task in done:
                    killed = killed or RealiseStatus.ABORTED
                    _kill_group(proc)
                    waiters.discard(abort_task)
                elif not done:
                    killed = killed or RealiseStatus.TIMED_OUT
                    _kill_group(proc)
            await pump
            out = await out_task
            code = await proc.wait()
        finally:
            if abort_task is not None:
                abort_task.cancel()
            if proc.returncode is None:
                _kill_group(proc)
                with contextlib.suppress(ProcessLookupError):
                    await proc.wait()
            for task in (pump, out_task):
                if not task.done():
                    task.cancel()
        text = tail.decode(errors="replace")
        status = killed or classify_exit(code)
        return RealiseResult(
            status=status,
            exit_code=code,
            output_paths=[p for p in out.decode().split() if p.startswith("/")],
            error="" if status is RealiseStatus.SUCCESS else last_error_line(text),
            log_bytes=log_bytes,
        )


@dataclass(frozen=True, slots=True)
class BoundedRun:
    """How a ``nix eval`` under a memory and time limit ended (``NixStore.eval_bounded``)."""

    exit_code: int | None
    stdout: bytes
    stderr: str
    timed_out: bool = False
    aborted: bool = False
    out_of_memory: bool = False
    """Nix ran out of its address-space limit ("out of memory", or killed by a signal while
    the limit was in force)."""
    stdout_limit: bool = False
    """The answer was larger than ``max_stdout_bytes``."""
    peak_rss_bytes: int = 0
    """The process's peak resident memory as last sampled (``/proc/PID/status`` VmHWM)."""


async def _read_bounded(stream: asyncio.StreamReader, limit: int) -> tuple[bytes, bool]:
    out = bytearray()
    while chunk := await stream.read(256 * 1024):
        if len(out) + len(chunk) > limit:
            return bytes(out), True
        out += chunk
    return bytes(out), False


async def _read_tail(stream: asyncio.StreamReader, keep: int) -> bytes:
    """All of ``stream`` read, its last ``keep`` bytes kept."""
    tail = bytearray()
    while chunk := await stream.read(256 * 1024):
        tail += chunk
        del tail[:-keep]
    return bytes(tail)


def _peak_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _tree_peak_rss(pid: int) -> int:
    """The largest peak resident memory of ``pid`` and its descendants (Nix runs below
    bubblewrap's processes in a sandbox)."""
    peak = 0
    todo = [pid]
    seen = 0
    while todo and seen < 64:
        current = todo.pop()
        seen += 1
        peak = max(peak, _peak_rss(current))
        try:
            with open(f"/proc/{current}/task/{current}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return peak


class BoundedEval:
    """``nix eval --json`` of an expression with an operating-system memory limit
    (``RLIMIT_AS`` through util-linux ``prlimit``: Nix's allocator fails at the limit and Nix
    exits with "out of memory"), a wall-clock timeout and an abort event; stdout bounded.
    The process runs in its own process group, killed whole on timeout or abort."""

    def __init__(self, store: NixStore) -> None:
        self.store = store

    async def run(
        self,
        expr: str,
        *,
        max_memory_bytes: int,
        timeout_secs: float,
        max_stdout_bytes: int,
        abort: asyncio.Event | None = None,
        features: str = "nix-command flakes",
        show_trace: bool = False,
        sandbox: EvalSandbox | None = None,
    ) -> BoundedRun:
        """``sandbox``: run Nix under bubblewrap with only that file system
        (``bigtent.nix.sandbox``); the limits apply inside it."""
        trace = ["--show-trace"] if show_trace else []
        argv = self.store._argv(
            "nix",
            ["--extra-experimental-features", features, "eval", *trace, "--json", "--expr", expr],
            None,
        )
        env = self.store._environ()
        argv = ["prlimit", f"--as={max_memory_bytes}", "--", *argv]
        if sandbox is not None:
            # Nix and prlimit by their real files: a profile link may lie outside the sandbox.
            argv[0] = resolve_program("prlimit", env.get("PATH"))
            argv[3] = resolve_program(argv[3], env.get("PATH"))
            argv = [*bwrap_argv(sandbox), *argv]
            env = sandbox_env(env, sandbox)
        log.debug("running %s", argv[:6])
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise NixError(f"{argv[0]} not found (util-linux and Nix needed)", argv=argv) from exc
        assert proc.stdout is not None and proc.stderr is not None
        out_task = asyncio.create_task(_read_bounded(proc.stdout, max_stdout_bytes))
        err_task = asyncio.create_task(_read_tail(proc.stderr, _STDERR_TAIL_BYTES * 4))
        peak = 0

        async def sample() -> None:
            nonlocal peak
            while proc.returncode is None:
                peak = max(peak, _tree_peak_rss(proc.pid))
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        waiters: set[asyncio.Future[object]] = {out_task}  # type: ignore[arg-type]
        abort_task: asyncio.Task[bool] | None = None
        if abort is not None:
            abort_task = asyncio.create_task(abort.wait())
            waiters.add(abort_task)  # type: ignore[arg-type]
        timed_out = aborted = False
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=timeout_secs, return_when=asyncio.FIRST_COMPLETED
            )
            if out_task not in done:
                timed_out = not done
                aborted = bool(done)
                _kill_group(proc)
            out, too_big = await out_task
            if too_big:
                _kill_group(proc)
            err = await err_task
            code = await proc.wait()
        finally:
            if abort_task is not None:
                abort_task.cancel()
            if proc.returncode is None:
                _kill_group(proc)
                with contextlib.suppress(ProcessLookupError):
                    await proc.wait()
            for task in (out_task, err_task, sampler):
                if not task.done():
                    task.cancel()
        text = err.decode(errors="replace")
        oom = (
            not (timed_out or aborted or too_big)
            and code != 0
            and (
                "out of memory" in text.lower()
                or code < 0
                or "failed to map segment" in text
                # bwrap exits 128 + N when the process it ran was killed by signal N.
                or (sandbox is not None and code > 128)
            )
        )
        return BoundedRun(code, out, text, timed_out, aborted, oom, too_big, peak)


def store_root(store: str) -> str:
    """The chroot directory of a ``local?root=DIR`` (or bare path) store URI, else ""."""
    if store.startswith("/"):
        return store.rstrip("/")
    if store.startswith("local?") or store.startswith("local://?"):
        query = store.split("?", 1)[1]
        for part in query.split("&"):
            key, _, value = part.partition("=")
            if key == "root":
                return value.rstrip("/")
    return ""


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


COMMAND_SHOWN_CHARS = 4000
"""The longest command line an error message quotes (a path-info of a whole closure names
thousands of paths): longer ones end with a count of the arguments left out."""


def command_line(argv: Sequence[str], limit: int = COMMAND_SHOWN_CHARS) -> str:
    """``argv`` as a shell command (quoted so that it can be run again), whole when it fits in
    ``limit`` characters, else its first arguments and how many more there were."""
    shown: list[str] = []
    size = 0
    for index, arg in enumerate(argv):
        word = shlex.quote(arg)
        if shown and size + len(word) + 1 > limit:
            return " ".join(shown) + f" … ({len(argv) - index} more arguments)"
        shown.append(word)
        size += len(word) + 1
    return " ".join(shown)


def evaluation_failure(argv: Sequence[str], status: int | None, stderr: str) -> str:
    """The message of a failed evaluation: Nix's whole error as it printed it (message,
    ``at FILE:LINE:COL``, code frame, trace), then the command that failed."""
    text = stderr.strip("\n").rstrip() or "(Nix printed nothing)"
    return f"evaluation failed (exit {status}):\n{text}\ncommand: {command_line(argv)}"


def last_error_line(stderr: str) -> str:
    """The last ``error:`` line of Nix's stderr (else its last line): what went wrong. When
    the build hook declined every remote machine, Nix's last line only says so ("unable to
    start any build; remote machines may not have all required system features"): the line
    that says why a machine was given up ("cannot build on 'URI': …") comes first."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    why = [line for line in lines if "cannot build on '" in line]
    for line in reversed(lines):
        if line.startswith("error:"):
            return (
                f"{why[-1].strip()}; {line}"
                if why and "unable to start any build" in line
                else line
            )
    return lines[-1] if lines else ""
