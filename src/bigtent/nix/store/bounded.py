"""``nix eval`` under an operating-system memory limit, a wall-clock timeout and an abort
event, its output bounded and its peak memory sampled (CI evaluation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass

from bigtent.errors import NixError
from bigtent.nix.sandbox import EvalSandbox, bwrap_argv, probe_argv, resolve_program, sandbox_env
from bigtent.nix.store.nixstore import STDERR_TAIL_BYTES, NixStore, kill_group

log = logging.getLogger(__name__)


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
        argv = self.store.command_argv(
            "nix",
            ["--extra-experimental-features", features, "eval", *trace, "--json", "--expr", expr],
            None,
        )
        env = self.store.environ()
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
        err_task = asyncio.create_task(_read_tail(proc.stderr, STDERR_TAIL_BYTES * 4))
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
                kill_group(proc)
            out, too_big = await out_task
            if too_big:
                kill_group(proc)
            err = await err_task
            code = await proc.wait()
        finally:
            if abort_task is not None:
                abort_task.cancel()
            if proc.returncode is None:
                kill_group(proc)
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


async def probe_sandbox(sandbox: EvalSandbox, timeout_secs: float) -> str | None:
    """Whether Nix runs in ``sandbox`` (``nix --version`` under bubblewrap): None, else why
    not."""
    path_env = os.environ.get("PATH")
    argv = probe_argv(bwrap_argv(sandbox), resolve_program("nix", path_env))
    problem: str | None = None
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        problem = f"cannot run {argv[0]} ({exc.strerror}): install bubblewrap"
    else:
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_secs)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
            problem = f"bwrap did not answer within {timeout_secs:g} s"
        else:
            if proc.returncode != 0 or b"nix" not in out.lower():
                text = err.decode(errors="replace").strip().splitlines()
                problem = f"bwrap failed (exit {proc.returncode}): " + (
                    text[-1] if text else "no message"
                )
    return problem
