"""``NixStore``: thin async wrappers over nix-store, nix-instantiate and nix, each run with
the configured store (``--store``) and options."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

from bigtent.errors import NixError
from bigtent.nix.store.messages import command_line, evaluation_failure, last_error_line
from bigtent.nix.store.results import (
    LineSink,
    PathInfo,
    RealiseResult,
    RealiseStatus,
    classify_exit,
    store_root,
)

log = logging.getLogger(__name__)

NIX_COMMAND = ("--extra-experimental-features", "nix-command")
STDERR_TAIL_BYTES = 16 * 1024


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
    def command_argv(
        self, tool: str, args: Sequence[str], extra: Mapping[str, str] | None
    ) -> list[str]:
        argv = [os.path.join(self.bin_dir, tool) if self.bin_dir else tool]
        if tool == "nix":
            argv += NIX_COMMAND
        if self.store:
            argv += ["--store", self.store]
        for key, value in {**self.options, **(extra or {})}.items():
            argv += ["--option", key, value]
        argv += list(args)
        return argv

    def environ(self) -> dict[str, str]:
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
        argv = self.command_argv(tool, args, options)
        log.debug("running %s", argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**self.environ(), **(env or {})},
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
        argv = self.command_argv("nix-instantiate", [*features, *args], None)
        log.debug("running %s", argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.environ(),
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
        argv = self.command_argv("nix-store", ["--check-validity", "--print-invalid", *paths], None)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.environ(),
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
        argv = self.command_argv("nix-store", ["--dump", path], None)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.environ(),
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
        argv = self.command_argv("nix-store", ["--serve", "--write"], None)
        log.debug("running %s", argv)
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=write_fd,
                env=self.environ(),
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
        argv = self.command_argv("nix-store", args, extra)
        log.debug("running %s", argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.environ(),
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
                del tail[:-STDERR_TAIL_BYTES]
                if max_log_bytes is not None and log_bytes > max_log_bytes:
                    killed = killed or RealiseStatus.LOG_LIMIT
                    kill_group(proc)
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
                    kill_group(proc)
                    waiters.discard(abort_task)
                elif not done:
                    killed = killed or RealiseStatus.TIMED_OUT
                    kill_group(proc)
            await pump
            out = await out_task
            code = await proc.wait()
        finally:
            if abort_task is not None:
                abort_task.cancel()
            if proc.returncode is None:
                kill_group(proc)
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


def kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def spawn_daemon_stdio(
    nix_daemon: str = "nix-daemon", store: str | None = None
) -> asyncio.subprocess.Process:
    """Start ``nix-daemon --stdio`` (the daemon worker protocol on stdin and stdout) for
    ``store`` (default: Nix's own), for ``client/storeproxy.py`` to relay a connection to.
    ``FileNotFoundError`` when there is no such program."""
    argv = [nix_daemon, "--stdio", *(["--store", store] if store else [])]
    log.debug("running %s", argv)
    return await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
