"""The ``bigtent`` command line: parse, call one function, render with rich (architecture §7).

Every ``BigtentError`` reaching ``main`` becomes one ``Error: ...`` line on stderr and the error's
exit code; Ctrl-C exits 130. Logging is configured here and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from bigtent import __version__, humanize
from bigtent.apilimits import BUILD_DRVS_MAX, PRIORITY_MAX, PRIORITY_MIN
from bigtent.config import (
    OidcProvider,
    Role,
    load_agent_config,
    load_runner_config,
    split_comma_list,
)
from bigtent.errors import (
    BigtentError,
    BuildFailed,
    BuildTimedOut,
    ConfigError,
    Terminated,
    UsageError,
)

if TYPE_CHECKING:  # the client modules load lazily, inside the commands
    from bigtent.apimodels import Agent
    from bigtent.client.api import Build, RunnerClient, Step, StepAttempt, WaitingStep
    from bigtent.client.build import BuildTracker
    from bigtent.client.progress import StepLogStreams

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

DEFAULT_RUNNER_URL = "http://127.0.0.1:8080"
"""Where ``bigtent up`` listens by default."""
_SERVICE_COMMANDS = frozenset({"runner", "agent", "up"})
_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# ---- entry point ---------------------------------------------------------------------------


def main(args: Sequence[str] | None = None) -> NoReturn:
    """Console entry point: the one place that turns failures into messages and exit codes."""
    try:
        rv = cli.main(
            args=list(args) if args is not None else None,
            prog_name="bigtent",
            standalone_mode=False,
        )
    except BigtentError as exc:
        click.echo(f"Error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):
            sys.exit(130)
        click.echo("Aborted!", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


def _configure_logging(verbose: int, service: bool) -> None:
    """Services log INFO by default, client commands only warnings; -v/-vv raise the level."""
    if verbose >= 2:
        level = logging.DEBUG
    elif verbose == 1 or service:
        level = logging.INFO
    else:
        level = logging.WARNING
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if verbose < 2:
        # alembic logs a line per plugin and per migration at INFO: `bigtent up` and the runner
        # say what the schema did in one line of their own.
        for noisy in ("httpx", "httpcore", "websockets", "aiosqlite", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


@click.group(context_settings=_CONTEXT)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(__version__, prog_name="bigtent")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """bigtent: a distributed Nix build farm with a signed binary cache."""
    _configure_logging(verbose, ctx.invoked_subcommand in _SERVICE_COMMANDS)


# ---- shared client plumbing ---------------------------------------------------------------


def _read_secret(path: Path, what: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if not text:
        raise ConfigError(f"{what} {path} is empty")
    return text


def _client_options(f: _F) -> _F:
    f = click.option(
        "--ca-file",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="BIGTENT_CA_FILE",
        help="CA certificate of an https runner with a private CA [env: BIGTENT_CA_FILE].",
    )(f)
    f = click.option(
        "--token-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="File holding the client token (without it: the token in BIGTENT_TOKEN, if set).",
    )(f)
    f = click.option(
        "--runner",
        "runner_url",
        envvar="BIGTENT_URL",
        multiple=True,
        default=[DEFAULT_RUNNER_URL],
        show_default=True,
        metavar="URL",
        callback=_join_runner_urls,
        help="Runner URL; repeat it (or separate URLs by commas) for runners sharing one "
        "database, tried in order when one is unavailable [env: BIGTENT_URL].",
    )(f)
    return f


def _join_runner_urls(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> str:
    """``--runner`` given several times (or ``BIGTENT_URL`` with commas): one comma-separated
    string, which ``RunnerClient`` splits again."""
    return ",".join(value)


def _json_option(f: _F) -> _F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def _call(
    runner_url: str,
    token_file: Path | None,
    ca_file: Path | None,
    request: Callable[[RunnerClient], Awaitable[_T]],
) -> _T:
    """Run one request against the runner (the shape of every read/act command)."""

    async def go() -> _T:
        async with _make_client(runner_url, token_file, ca_file) as client:
            return await request(client)

    return _run(go())


def _make_client(runner_url: str, token_file: Path | None, ca_file: Path | None) -> RunnerClient:
    from bigtent.client.api import RunnerClient

    if token_file is not None:
        token: str | None = _read_secret(token_file, "token file")
        source = f"--token-file {token_file}"
    else:
        token = os.environ.get("BIGTENT_TOKEN") or None
        source = "BIGTENT_TOKEN"
    return RunnerClient(runner_url, token=token, ca_file=ca_file, token_source=source)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _console() -> Console:
    # Piped output gets wide lines instead of rich's 80 columns with truncated cells.
    from bigtent.client.tables import terminal_width

    return Console(highlight=False, width=terminal_width())


# ---- build ----------------------------------------------------------------------------------


class _RichBuildObserver:
    """Progress on stderr: phase lines, an upload bar, then a build bar with the step summary."""

    def __init__(self, logs: StepLogStreams | None = None) -> None:
        self.logs = logs
        self.console = Console(stderr=True, highlight=False)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._upload: TaskID | None = None
        self._build: TaskID | None = None

    def __enter__(self) -> _RichBuildObserver:
        self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def on_phase(self, message: str) -> None:
        self.progress.console.print(message, markup=False)

    def on_upload(self, done: int, total: int) -> None:
        if self._upload is None:
            self._upload = self.progress.add_task("uploading", total=total)
        self.progress.update(self._upload, completed=done, total=total)

    def on_progress(self, build: Build) -> None:
        from bigtent.client.build import capacity_summary, progress_line

        c = build.counts
        done = c.succeeded + c.failed + c.cancelled
        text = f"build {build.id} {build.state.value}: {progress_line(build)}"
        waiting = capacity_summary(build)
        if waiting:
            text += f" ({waiting})"
        if not c.total and build.state.is_final:
            done = 1  # nothing to build: a full bar, not 0/1
        if self._build is None:
            self._build = self.progress.add_task(text, total=max(c.total, 1))
        self.progress.update(self._build, description=text, completed=done, total=max(c.total, 1))

    def on_attempt(self, attempt: StepAttempt) -> None:
        """A failed infrastructure attempt, as the poll that sees it comes in."""
        from bigtent.client.build import attempt_notice

        notice = attempt_notice(attempt)
        if notice is not None:
            self.progress.console.print(notice, markup=False, style="yellow", soft_wrap=True)

    def on_waiting_for_capacity(self, steps: Sequence[WaitingStep]) -> None:
        from bigtent.client.build import waiting_line

        for step in steps:
            self.progress.console.print(
                waiting_line(step), markup=False, style="yellow", soft_wrap=True
            )

    def on_steps(self, steps: Sequence[Step]) -> None:
        if self.logs is not None:
            self.logs.watch(steps)

    def print_log_line(self, line: str) -> None:
        """A line of ``-L``: above the bars, exactly as the builder wrote it."""
        self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)


def _report_failure(build: Build, labels: Mapping[str, str] | None = None) -> None:
    """Which requested derivations failed (by attribute path when known), why, and the tail
    of each failed step's log.

    Plain lines (no rich wrapping or markup): log text is shown exactly as the builder wrote it.
    """
    from bigtent.client.build import failed_roots

    names = labels or {}
    click.secho(f"build {build.id} {build.state.value}", err=True, fg="red", bold=True)
    for root in failed_roots(build):
        name = (
            f"{names[root.drv_path]} ({root.drv_path})" if root.drv_path in names else root.drv_path
        )
        click.echo(f"  not built: {name} ({root.state or 'unknown'})", err=True)
    for step in build.failed_steps:
        why = ", ".join(x for x in (step.outcome, step.error) if x) or step.state
        click.secho(f"  failed step {step.id}: {step.drv_path}: {why}", err=True, fg="red")
        if step.log_tail:
            click.echo(f"  last lines of its log (full log: bigtent log {step.id}):", err=True)
            for line in step.log_tail.rstrip("\n").splitlines():
                click.echo(f"    {line}", err=True)


@cli.command(context_settings=_CONTEXT)
@click.argument("targets", nargs=-1, metavar="[FILE.nix... | FLAKEREF#ATTR...]")
@click.option(
    "-A",
    "--attr",
    "attrs",
    multiple=True,
    metavar="ATTR",
    help="Attribute path to build (repeatable); a set of derivations builds each of them.",
)
@click.option("-E", "--expr", metavar="EXPR", help="Build a Nix expression instead of a file.")
@click.option(
    "--arg",
    "arg_exprs",
    nargs=2,
    multiple=True,
    metavar="NAME EXPR",
    help="Pass the Nix expression EXPR as argument NAME to a function at the top.",
)
@click.option(
    "--argstr",
    "arg_strings",
    nargs=2,
    multiple=True,
    metavar="NAME VALUE",
    help="Pass the string VALUE as argument NAME to a function at the top.",
)
@click.option(
    "-I",
    "--include",
    "include",
    multiple=True,
    metavar="PATH",
    help="Add PATH (or NAME=PATH) to the Nix search path, as nix-build -I.",
)
@click.option("--show-trace", is_flag=True, help="Show Nix's trace of an evaluation error.")
@click.option("--drv", "drvs", multiple=True, metavar="PATH", help="Build a store derivation.")
@_client_options
@click.option(
    "--priority",
    type=click.IntRange(PRIORITY_MIN, PRIORITY_MAX),
    default=0,
    show_default=True,
    help="Build priority.",
)
@click.option("--no-download", is_flag=True, help="Do not fetch the outputs into the local store.")
@click.option(
    "-o",
    "--out-link",
    default="result",
    show_default=True,
    metavar="PATH",
    help="Name of the result links (result, result-2, result-dev, ...).",
)
@click.option("--no-out-link", is_flag=True, help="Fetch the outputs but create no links.")
@click.option("--repository", metavar="OWNER/NAME", help="The repository the build is for.")
@click.option("--ref", metavar="REF", help="The git ref it is for, e.g. refs/heads/main.")
@click.option(
    "--untrusted",
    is_flag=True,
    help="Make an untrusted build (its outputs go to the untrusted cache only).",
)
@click.option(
    "--timeout",
    metavar="DURATION",
    help="Stop waiting after DURATION (90s, 10m, 2h, 1h30m): exit 124 and show what was "
    "still pending.",
)
@click.option(
    "--cancel-on-exit",
    is_flag=True,
    help="On --timeout, Ctrl-C or SIGTERM, cancel the build (its steps no other build needs).",
)
@click.option(
    "-L",
    "--print-build-logs",
    "print_logs",
    is_flag=True,
    help="Print the running steps' log lines on stderr, each prefixed with its derivation's "
    "name, as nix build -L does.",
)
@_json_option
def build(
    targets: tuple[str, ...],
    attrs: tuple[str, ...],
    expr: str | None,
    arg_exprs: tuple[tuple[str, str], ...],
    arg_strings: tuple[tuple[str, str], ...],
    include: tuple[str, ...],
    show_trace: bool,
    drvs: tuple[str, ...],
    runner_url: str,
    token_file: Path | None,
    ca_file: Path | None,
    priority: int,
    no_download: bool,
    out_link: str,
    no_out_link: bool,
    repository: str | None,
    ref: str | None,
    untrusted: bool,
    timeout: str | None,
    cancel_on_exit: bool,
    print_logs: bool,
    as_json: bool,
) -> None:
    """Build derivations on the farm and fetch their outputs, like nix-build.

    Targets as nix-build takes them (FILE.nix or -E EXPR, -A, --arg, --argstr, -I), flake
    installables (.#checks.x86_64-linux: a set of derivations builds each), or --drv paths.

    On a terminal progress is a bar; elsewhere (a CI log, a pipe) one line per step event
    (started on AGENT, succeeded in N s, failed, retrying, waiting for capacity).

    Exits 0 only when every requested derivation built, 1 when one did not (or evaluation
    failed), 2 for a usage or configuration error, 124 when --timeout ran out, 130 on Ctrl-C
    and 143 on SIGTERM (the build keeps running unless --cancel-on-exit). A build is trusted
    only when the token is (admin, or a client token marked trusted) and REF is no pull
    request ref.
    """
    from bigtent.apilimits import build_field_problem
    from bigtent.client.build import (
        BuildObserver,
        BuildOptions,
        BuildTracker,
        SilentObserver,
        build_report,
        failed_roots,
        job_labels,
        parse_duration,
        run_build,
    )
    from bigtent.client.progress import PlainBuildObserver, StepLogStreams
    from bigtent.client.targets import (
        AutoArg,
        evaluate_targets,
        evaluation_summary,
        parse_targets,
    )
    from bigtent.nix.store import NixStore

    timeout_secs = parse_duration(timeout) if timeout is not None else None
    problem = build_field_problem(repository, ref)
    if problem is not None:
        raise UsageError(problem)
    kinds = parse_targets(
        targets,
        attrs=attrs,
        drvs=drvs,
        expr=expr,
        auto_args=[AutoArg(n, v) for n, v in arg_exprs]
        + [AutoArg(n, v, is_string=True) for n, v in arg_strings],
        include=include,
        show_trace=show_trace,
    )
    store = NixStore(store=os.environ.get("NIX_REMOTE", ""))
    plain = not as_json and not sys.stderr.isatty()
    options = BuildOptions(
        priority=priority,
        download=not no_download,
        out_link=None if no_out_link else out_link,
        repository=repository,
        ref=ref,
        trusted=not untrusted,
        follow_steps=plain or print_logs,
    )
    tracker = BuildTracker()
    client = _make_client(runner_url, token_file, ca_file)
    stop = _Stop(cancel=cancel_on_exit)
    logs: StepLogStreams | None = None

    async def go(observer: BuildObserver) -> Any:
        async with client:
            loop = asyncio.get_running_loop()
            main = asyncio.current_task()
            assert main is not None
            loop.add_signal_handler(signal.SIGTERM, stop.terminate, main)
            deadline = asyncio.timeout(timeout_secs)
            try:
                async with deadline:
                    evaluation = await evaluate_targets(store, kinds)
                    for line in evaluation_summary(evaluation):
                        observer.on_phase(line)
                    if len(evaluation.drv_paths) > BUILD_DRVS_MAX:
                        raise UsageError(
                            f"the targets evaluated to {len(evaluation.drv_paths)} derivations; "
                            f"a build takes at most {BUILD_DRVS_MAX}: build them in parts"
                        )
                    tracker.jobs = evaluation.jobs
                    result = await run_build(
                        client, store, evaluation.drv_paths, options, observer, tracker
                    )
                    if logs is not None:
                        await logs.close()
                    return result
            except TimeoutError:
                if not deadline.expired():
                    raise  # not --timeout's
                stop.reason = "timeout"
                await stop.wind_up(client, tracker)
                raise
            except asyncio.CancelledError:
                stop.reason = stop.reason or "interrupted"
                while main.uncancel():
                    pass
                await stop.wind_up(client, tracker)
                raise
            finally:
                loop.remove_signal_handler(signal.SIGTERM)
                if logs is not None:
                    await logs.close(wait_secs=0)

    def err_line(line: str) -> None:
        click.echo(line, err=True)

    try:
        if as_json:
            logs = StepLogStreams(client, err_line) if print_logs else None
            result = _run(go(SilentObserver(logs)))
        elif plain:
            logs = StepLogStreams(client, err_line) if print_logs else None
            result = _run(go(PlainBuildObserver(err_line, logs)))
        else:
            with _RichBuildObserver() as observer:
                if print_logs:
                    logs = observer.logs = StepLogStreams(client, observer.print_log_line)
                result = _run(go(observer))
    except (KeyboardInterrupt, asyncio.CancelledError, TimeoutError):
        if stop.reason is None:
            raise
        _report_stop(stop, tracker, as_json, timeout)
        if stop.reason == "timeout":
            if tracker.build_id is None:
                raise BuildTimedOut(f"no build was created within {timeout}") from None
            raise BuildTimedOut(f"build {tracker.build_id} did not end within {timeout}") from None
        if stop.reason == "terminated":
            raise Terminated("terminated (SIGTERM)") from None
        raise KeyboardInterrupt from None
    if as_json:
        _echo_json(build_report(result.build, result.links, result.attempts, tracker.jobs))
    elif result.succeeded:
        if result.links:
            for link in result.links:
                click.echo(link.path)
        else:
            for root in result.build.roots:
                for path in root.outputs.values():
                    click.echo(path)
    else:
        _report_failure(result.build, job_labels(tracker.jobs))
    if not result.succeeded:
        failed = failed_roots(result.build)
        raise BuildFailed(
            f"build {result.build.id} {result.build.state.value}: "
            f"{len(failed)} of {len(result.build.roots)} requested derivation(s) did not build"
        )


class _Stop:
    """Why ``bigtent build`` stopped before its build ended, and what it saw then."""

    def __init__(self, *, cancel: bool) -> None:
        self.cancel = cancel
        self.reason: str | None = None
        """``timeout``, ``interrupted`` (Ctrl-C) or ``terminated`` (SIGTERM)."""
        self.pending: list[Step] = []
        self.cancelled = False

    def terminate(self, main: asyncio.Task[Any]) -> None:
        """SIGTERM: stop as Ctrl-C does (the main task is cancelled)."""
        self.reason = self.reason or "terminated"
        main.cancel()

    async def wind_up(self, client: RunnerClient, tracker: BuildTracker) -> None:
        """What was still pending, then (``--cancel-on-exit``) cancel the build: bounded,
        and a runner that does not answer only costs the report."""
        from bigtent.client.build import pending_steps

        build_id = tracker.build_id
        if build_id is None:
            return
        try:
            async with asyncio.timeout(_WIND_UP_SECS):
                self.pending = pending_steps(await client.fetch_steps(build_id))
                if self.cancel:
                    await client.cancel_build(build_id)
                    self.cancelled = True
                tracker.last = await client.fetch_build(build_id)
        except (BigtentError, TimeoutError) as exc:
            log.warning("could not finish up build %s: %s", build_id, exc)


_WIND_UP_SECS = 15.0
_PENDING_SHOWN = 20


def _report_stop(stop: _Stop, tracker: BuildTracker, as_json: bool, timeout: str | None) -> None:
    """The notice of a ``bigtent build`` that stops before its build ended."""
    from bigtent.client.build import pending_line, stop_report

    if as_json:
        _echo_json(
            stop_report(
                tracker.last,
                stop.pending,
                reason=stop.reason or "",
                cancelled=stop.cancelled,
                jobs=tracker.jobs,
            )
        )
    build_id = tracker.build_id
    if build_id is None:
        return
    why = {
        "timeout": f"no result within {timeout}",
        "terminated": "terminated (SIGTERM)",
    }.get(stop.reason or "", "interrupted")
    if stop.pending:
        click.echo(f"{why}: {len(stop.pending)} step(s) of build {build_id} pending:", err=True)
        for step in stop.pending[:_PENDING_SHOWN]:
            click.echo(f"  {pending_line(step)}", err=True)
        if len(stop.pending) > _PENDING_SHOWN:
            click.echo(f"  and {len(stop.pending) - _PENDING_SHOWN} more", err=True)
    else:
        click.echo(f"{why}", err=True)
    if stop.cancelled:
        click.echo(f"build {build_id} cancelled (its steps no other build needs)", err=True)
    else:
        click.echo(
            f"build {build_id} keeps running on the runner; "
            f"stop it with: bigtent cancel {build_id}",
            err=True,
        )


# ---- read-only views and build control -----------------------------------------------------


@cli.command(context_settings=_CONTEXT)
@_client_options
@_json_option
def status(runner_url: str, token_file: Path | None, ca_file: Path | None, as_json: bool) -> None:
    """Show the runner's version, cache and queue."""

    st = _call(runner_url, token_file, ca_file, lambda c: c.fetch_status())
    if as_json:
        _echo_json(st.model_dump(mode="json"))
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("runner", runner_url)
    table.add_row("version", st.version)
    table.add_row("cache", st.cache_url)
    table.add_row("public key", st.cache_public_key)
    if st.untrusted_cache_url:
        key = st.untrusted_cache_public_key or "?"
        table.add_row("untrusted cache", f"{st.untrusted_cache_url} ({key})")
    for up in st.upstreams:
        table.add_row("upstream", f"{up.url} ({up.public_key})")
    table.add_row("agents connected", str(st.agents_connected))
    table.add_row("builds active", str(st.builds_active))
    if st.steps_waiting_for_capacity:
        table.add_row(
            "waiting for capacity",
            f"{st.steps_waiting_for_capacity} step(s) no agent, SSH builder or pool can take",
        )
    steps = ", ".join(f"{k} {v}" for k, v in sorted(st.steps.items()) if v) or "none"
    table.add_row("steps", steps)
    _console().print(table)


_AGENT_COLUMNS = (
    ("name", True),
    ("kind", False),
    ("trust", False),
    ("auth", False),
    ("connected", False),
    ("health", False),
    ("last seen", True),
    ("jobs", False),
    ("backoff", False),
    ("systems", False),
    ("features", False),
    ("launch", True),  # an id a reader copies: never folded
)


def _agent_auth(a: Agent) -> str:
    """``token``, or ``oidc:<repository>`` for an agent that authenticated as a CI job."""
    if a.oidc is not None:
        return f"oidc:{a.oidc.repository}"
    return a.auth_kind or "-"


def _agent_trust(a: Agent) -> str:
    """``trusted``/``untrusted`` and, for a venue scoped to repositories, which ones."""
    trust = "trusted" if a.trusted else "untrusted"
    if a.build_repositories is not None:
        trust += " " + ",".join(a.build_repositories)
    return trust


def _agent_health(a: Agent) -> str:
    """``ok``, or ``unhealthy: <first line of its last error>``."""
    if not a.unhealthy:
        return "ok"
    first = (a.last_error or "").strip().splitlines()
    return "unhealthy: " + (first[0][:_HEALTH_ERROR_CHARS] if first else "no error text")


_HEALTH_ERROR_CHARS = 80


def _agent_row(a: Agent, now: datetime) -> list[str]:
    features = [*a.supported_features, *(f"{f}!" for f in a.mandatory_features)]
    connected = "yes" if a.connected else "no"
    if a.draining:
        connected += " (draining)"
    backoff = "-"
    if a.backoff_until:
        until = humanize.relative_iso(a.backoff_until, now)
        until = until if until.startswith("in ") else f"until {until}"  # "in 30 s"
        backoff = f"{until} ({a.consecutive_failures} failures)"
    return [
        a.name,
        "ephemeral" if a.ephemeral else "persistent",
        _agent_trust(a),
        _agent_auth(a),
        connected,
        _agent_health(a),
        humanize.relative_iso(a.last_seen, now),
        f"{a.running}/{a.max_jobs}",
        backoff,
        ", ".join(a.systems),
        ", ".join(features),
        a.launch_id or "-",
    ]


@cli.group(context_settings=_CONTEXT, invoke_without_command=True)
@_client_options
@_json_option
@click.pass_context
def agents(
    ctx: click.Context,
    runner_url: str,
    token_file: Path | None,
    ca_file: Path | None,
    as_json: bool,
) -> None:
    """List the agents the runner knows (mandatory features end in '!').

    `bigtent agents drain NAME` drains one.
    """
    if ctx.invoked_subcommand is not None:
        return

    rows = _call(runner_url, token_file, ca_file, lambda c: c.fetch_agents())
    if as_json:
        _echo_json([a.model_dump(mode="json") for a in rows])
        return
    from bigtent.client.tables import Column, now_utc, print_table

    now = now_utc()
    columns = [Column(header, key=key) for header, key in _AGENT_COLUMNS]
    print_table(columns, [_agent_row(a, now) for a in rows])


@cli.command(context_settings=_CONTEXT)
@_client_options
@_json_option
def builders(runner_url: str, token_file: Path | None, ca_file: Path | None, as_json: bool) -> None:
    """List the SSH remote builders: usable or skipped (and why), load and backoff."""
    rows = _call(runner_url, token_file, ca_file, lambda c: c.fetch_builders())
    if as_json:
        _echo_json([b.model_dump(mode="json") for b in rows])
        return
    from bigtent.client.tables import Column, now_utc, print_table

    now = now_utc()
    columns = [Column("uri", key=True)] + [
        Column(c) for c in ("state", "systems", "features", "jobs", "speed", "backoff until")
    ]
    table_rows = []
    for b in rows:
        features = [*b.supported_features, *(f"{m}!" for m in b.mandatory_features)]
        table_rows.append(
            [
                b.uri,
                "usable" if b.usable else f"skipped: {b.reason}",
                ", ".join(b.systems),
                ", ".join(features),
                f"{b.running}/{b.max_jobs}" if b.usable else "",
                f"{b.speed_factor:g}" if b.usable else "",
                humanize.relative_iso(b.backoff_until, now, missing=""),
            ]
        )
    print_table(columns, table_rows)


@cli.command(context_settings=_CONTEXT)
@_client_options
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--pool", help="Only this pool's launches.")
@_json_option
def launches(
    runner_url: str,
    token_file: Path | None,
    ca_file: Path | None,
    limit: int,
    pool: str | None,
    as_json: bool,
) -> None:
    """List the autoscaler's pools and launches, newest first (admin token)."""
    data = _call(
        runner_url, token_file, ca_file, lambda c: c.fetch_launches(limit=limit, pool=pool)
    )
    if as_json:
        _echo_json(data.model_dump(mode="json"))
        return
    console = _console()
    if not data.pools:
        console.print("no [[autoscale.github]] pools configured")
    for p in data.pools:
        c = p.counters
        cooling = f", cooling down until {p.cooldown_until}" if p.cooldown_until else ""
        console.print(
            f"pool {p.name} ({p.workflow}): {p.pending}/{p.max_inflight} pending, "
            f"{p.demand} steps waiting, deficit {p.deficit}{cooling}; launched {c.launches}, "
            f"registered {c.registrations}, expired {c.expiries}, "
            f"dispatch failures {c.dispatch_failures}"
        )
    from bigtent.client.tables import Column, now_utc, print_table

    now = now_utc()
    columns = [Column("launch", key=True), Column("pool", key=True)] + [
        Column(c, key=c in ("created", "agent")) for c in ("state", "created", "agent", "error")
    ]
    print_table(
        columns,
        [
            [
                launch.launch_id,
                launch.pool,
                launch.state,
                humanize.relative_iso(launch.created_at, now),
                launch.agent_name or "-",
                launch.error or "",
            ]
            for launch in data.launches
        ],
    )


@agents.command("drain", context_settings=_CONTEXT)
@click.argument("name")
@_client_options
@_json_option
def agents_drain(
    name: str, runner_url: str, token_file: Path | None, ca_file: Path | None, as_json: bool
) -> None:
    """Drain agent NAME: it finishes its running steps and takes no new ones (admin token)."""

    drained = _call(runner_url, token_file, ca_file, lambda c: c.drain_agent(name))
    if as_json:
        _echo_json({"drained": drained})
    else:
        click.echo(f"agent {drained} is draining")


def _build_line(b: Build) -> str:
    from bigtent.client.build import progress_line

    return f"build {b.id}: {b.state.value}, priority {b.priority}, {progress_line(b)}"


_BUILD_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


@cli.command(context_settings=_CONTEXT)
@_client_options
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="Builds shown."
)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(_BUILD_STATES),
    help="Only builds in this state (repeatable).",
)
@click.option("--repository", metavar="OWNER/NAME", help="Only builds for this repository.")
@click.option("--ref", metavar="REF", help="Only builds for this git ref.")
@click.option("--mine", is_flag=True, help="Only builds created with this client's token.")
@_json_option
def builds(
    runner_url: str,
    token_file: Path | None,
    ca_file: Path | None,
    limit: int,
    states: tuple[str, ...],
    repository: str | None,
    ref: str | None,
    mine: bool,
    as_json: bool,
) -> None:
    """List recent builds, newest first (the runner filters them)."""

    rows = _call(
        runner_url,
        token_file,
        ca_file,
        lambda c: c.fetch_builds(
            limit=limit, states=states, repository=repository, ref=ref, mine=mine
        ),
    )
    if as_json:
        _echo_json([b.model_dump(mode="json") for b in rows])
        return
    from bigtent.client.tables import BUILD_COLUMNS, build_row, now_utc, print_table

    if not rows:
        click.echo("no builds", err=True)
        return
    now = now_utc()
    print_table(BUILD_COLUMNS, [build_row(b, now) for b in rows])


@cli.command(context_settings=_CONTEXT)
@click.argument("build_id", metavar="BUILD")
@_client_options
@_json_option
def steps(
    build_id: str, runner_url: str, token_file: Path | None, ca_file: Path | None, as_json: bool
) -> None:
    """List the steps of BUILD: name, state, agent, infrastructure retries, when it started,
    how long it took, and how it ended (or why it waits for capacity).

    `bigtent log STEP` shows a step's log."""
    rows = _call(runner_url, token_file, ca_file, lambda c: c.fetch_steps(build_id))
    if as_json:
        _echo_json([s.model_dump(mode="json") for s in rows])
        return
    from bigtent.client.tables import STEP_COLUMNS, now_utc, print_table, step_row

    if not rows:
        click.echo(f"build {build_id} has no steps: its outputs were cached", err=True)
        return
    now = now_utc()
    print_table(STEP_COLUMNS, [step_row(s, now) for s in rows])


@cli.command(
    "nix-hook",
    context_settings={**_CONTEXT, "ignore_unknown_options": True, "allow_extra_args": True},
)
@click.pass_context
def nix_hook(ctx: click.Context) -> None:
    """Nix's build hook: plain nix-build / nix build build on the farm (docs/nix-integration.md).

    nix.conf: build-hook = a wrapper running `bigtent-nix-hook --runner URL --token-file FILE
    "$@"` (this command is the same program; `bigtent-nix-hook --help` lists its options).
    """
    from bigtent.client.hookentry import main as hook_main

    ctx.exit(hook_main(ctx.args))


@cli.command("log", context_settings=_CONTEXT)
@click.argument("step")
@_client_options
@click.option(
    "-f/-F",
    "--follow/--no-follow",
    default=None,
    help="Keep printing the log as it grows until the step ends [default: --follow while "
    "the step runs or waits, --no-follow once it ended].",
)
def log_cmd(
    step: str,
    runner_url: str,
    token_file: Path | None,
    ca_file: Path | None,
    follow: bool | None,
) -> None:
    """Print the build log of STEP (ids: `bigtent steps BUILD`), following it while it runs."""
    from bigtent.client.progress import print_step_log

    def out(text: str) -> None:
        click.echo(text, nl=False)
        sys.stdout.flush()

    ended_line = _call(
        runner_url, token_file, ca_file, lambda c: print_step_log(c, step, out, follow=follow)
    )
    if not ended_line:
        click.echo()


@cli.command(context_settings=_CONTEXT)
@click.argument("build_id", metavar="BUILD")
@_client_options
@_json_option
def cancel(
    build_id: str, runner_url: str, token_file: Path | None, ca_file: Path | None, as_json: bool
) -> None:
    """Cancel BUILD (steps other builds still need keep running)."""

    b = _call(runner_url, token_file, ca_file, lambda c: c.cancel_build(build_id))
    if as_json:
        _echo_json(b.model_dump(mode="json"))
    else:
        click.echo(_build_line(b))


@cli.command(context_settings=_CONTEXT)
@click.argument("build_id", metavar="BUILD")
@_client_options
@_json_option
def restart(
    build_id: str, runner_url: str, token_file: Path | None, ca_file: Path | None, as_json: bool
) -> None:
    """Rebuild BUILD's failed, dependency-failed and cancelled steps.

    Clears the cached failures of its failed steps, which new builds otherwise do not
    rebuild until scheduler.failure_cache_ttl_secs has passed.
    """

    b = _call(runner_url, token_file, ca_file, lambda c: c.restart_build(build_id))
    if as_json:
        _echo_json(b.model_dump(mode="json"))
    else:
        click.echo(_build_line(b))


@cli.command(context_settings=_CONTEXT)
@click.argument("build_id", metavar="BUILD")
@click.option(
    "--priority",
    type=click.IntRange(PRIORITY_MIN, PRIORITY_MAX),
    help="New priority [default: current + 10].",
)
@_client_options
@_json_option
def bump(
    build_id: str,
    priority: int | None,
    runner_url: str,
    token_file: Path | None,
    ca_file: Path | None,
    as_json: bool,
) -> None:
    """Raise the priority of BUILD."""

    b = _call(runner_url, token_file, ca_file, lambda c: c.bump_build(build_id, priority=priority))
    if as_json:
        _echo_json(b.model_dump(mode="json"))
    else:
        click.echo(_build_line(b))


# ---- keys and tokens -------------------------------------------------------------------------


@cli.group(context_settings=_CONTEXT)
def keys() -> None:
    """Binary cache signing keys."""


def _write_new(path: Path, text: str, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as exc:
        raise UsageError(f"{path} already exists; use --force to overwrite it") from exc
    except OSError as exc:
        raise BigtentError(f"cannot write {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(mode)


@keys.command("generate", context_settings=_CONTEXT)
@click.argument("name")
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(),
    show_default=True,
    help="Where to write NAME.sk and NAME.pk.",
)
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def keys_generate(name: str, out_dir: Path, force: bool) -> None:
    """Generate a cache signing key NAME (nix-store --generate-binary-cache-key format).

    Writes NAME.sk (mode 0600) and NAME.pk, and prints the public key for
    trusted-public-keys.
    """
    from bigtent.nix.keys import generate_key

    try:
        key = generate_key(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if "/" in name:
        raise UsageError(f"key name must not contain '/' (got {name!r})")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BigtentError(f"cannot create {out_dir}: {exc.strerror}") from exc
    _write_new(out_dir / f"{name}.sk", key.to_text() + "\n", 0o600, force)
    _write_new(out_dir / f"{name}.pk", key.public_key().to_text() + "\n", 0o644, force)
    click.echo(key.public_key().to_text())


@cli.group(context_settings=_CONTEXT)
def token() -> None:
    """Bearer tokens for agents, clients and admins."""


@token.command("create", context_settings=_CONTEXT)
@click.option(
    "--role", required=True, type=click.Choice([r.value for r in Role]), help="What it may do."
)
@click.option("--name", help="Token name [default: ROLE-<random>].")
@click.option("--trusted", is_flag=True, help="Builds of this client token may count as trusted.")
@click.option(
    "--runner",
    "runner_url",
    metavar="URL",
    help="Store the token in this runner's database (admin token) instead of printing a "
    "runner.toml snippet.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --runner: file holding an admin token; without it the token is taken from "
    "BIGTENT_TOKEN (the token itself).",
)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="BIGTENT_CA_FILE",
    help="With --runner: CA certificate of an https runner [env: BIGTENT_CA_FILE].",
)
@_json_option
def token_create(
    role: str,
    name: str | None,
    trusted: bool,
    runner_url: str | None,
    token_file: Path | None,
    ca_file: Path | None,
    as_json: bool,
) -> None:
    """Create a token; it is printed once, the runner stores only its digest.

    Without --runner it prints a [[auth.tokens]] entry for runner.toml; with --runner the
    runner stores it and it works at once (`bigtent token revoke` ends it).
    """
    if runner_url is not None:
        created = _call(
            runner_url,
            token_file,
            ca_file,
            lambda c: c.create_token(role, name=name, trusted=trusted),
        )
        if as_json:
            _echo_json(created.model_dump(mode="json"))
            return
        click.echo(created.token)
        click.echo(
            f"\n# This token is shown only once. The runner stored it as {created.name!r} "
            f"(role {created.role}{', trusted' if created.trusted else ''}).",
            err=True,
        )
        return
    if token_file is not None:
        raise UsageError("--token-file needs --runner")

    import secrets

    from bigtent.runner.auth.tokens import generate_token, token_digest

    name = name or f"{role}-{secrets.token_hex(3)}"
    value = generate_token()
    digest = token_digest(value)
    if as_json:
        _echo_json(
            {"name": name, "role": role, "trusted": trusted, "token": value, "sha256": digest}
        )
        return
    click.echo(value)
    click.echo(
        "\n# This token is shown only once. Add to runner.toml:\n"
        "[[auth.tokens]]\n"
        f"name = {json.dumps(name)}\n"
        f"role = {json.dumps(role)}\n"
        f'sha256 = "{digest}"' + ("\ntrusted = true" if trusted else ""),
        err=True,
    )


@token.command("list", context_settings=_CONTEXT)
@_client_options
@_json_option
def token_list(
    runner_url: str, token_file: Path | None, ca_file: Path | None, as_json: bool
) -> None:
    """List the tokens stored in the runner's database, revoked ones too (admin token).

    Tokens in runner.toml are not listed.
    """
    rows = _call(runner_url, token_file, ca_file, lambda c: c.fetch_tokens())
    if as_json:
        _echo_json([t.model_dump(mode="json") for t in rows])
        return
    from bigtent.client.tables import Column, now_utc, print_table

    now = now_utc()
    columns = [Column("name", key=True)] + [
        Column(c, key=c in ("created", "revoked"))
        for c in ("role", "trusted", "created by", "created", "revoked")
    ]
    print_table(
        columns,
        [
            [
                t.name,
                t.role,
                "yes" if t.trusted else "no",
                t.created_by or "-",
                humanize.relative_iso(t.created_at, now),
                humanize.relative_iso(t.revoked_at, now),
            ]
            for t in rows
        ],
    )


@token.command("revoke", context_settings=_CONTEXT)
@click.argument("name")
@_client_options
@_json_option
def token_revoke(
    name: str, runner_url: str, token_file: Path | None, ca_file: Path | None, as_json: bool
) -> None:
    """Revoke the stored token NAME: it stops working at once (admin token)."""
    t = _call(runner_url, token_file, ca_file, lambda c: c.revoke_token(name))
    if as_json:
        _echo_json(t.model_dump(mode="json"))
    else:
        click.echo(f"revoked {t.name} (role {t.role}) at {t.revoked_at}")


# ---- SSH builders ----------------------------------------------------------------------------


@cli.group(context_settings=_CONTEXT)
def ssh() -> None:
    """SSH remote builders ([[ssh_builders]] in runner.toml)."""


@ssh.command("import", context_settings=_CONTEXT)
@click.argument("machines_file", type=click.Path(dir_okay=False, path_type=Path))
@_json_option
def ssh_import(machines_file: Path, as_json: bool) -> None:
    """Convert a Nix machines file (e.g. /etc/nix/machines) into [[ssh_builders]] entries."""
    from bigtent.runner.venues.ssh import parse_machines_file, render_ssh_builders_toml

    try:
        text = machines_file.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {machines_file}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{machines_file} is not a text file") from exc
    builders = parse_machines_file(text)
    if as_json:
        _echo_json([b.model_dump() for b in builders])
        return
    click.echo(render_ssh_builders_toml(builders), nl=False)
    unpinned = [b.name for b in builders if b.host_key is None]
    if unpinned:
        click.echo(
            f"# No host key for {', '.join(unpinned)}: with ssh_require_host_key = true "
            "(the default) the runner will not use them until host_key is set.",
            err=True,
        )


@ssh.command("check", context_settings=_CONTEXT)
@click.argument("name")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="runner.toml with the [[ssh_builders]] entry.",
)
@click.option(
    "--connect-timeout-secs",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="ssh ConnectTimeout.",
)
@_json_option
def ssh_check(name: str, config_path: Path, connect_timeout_secs: int, as_json: bool) -> None:
    """Connect to SSH builder NAME (user@host[:port], its URI or host) and print its Nix version."""
    from bigtent.runner.venues.ssh import find_builder
    from bigtent.runner.venues.sshcheck import check_ssh_builder

    cfg = load_runner_config(config_path)
    builder = find_builder(cfg.ssh_builders, name)
    result = check_ssh_builder(
        builder,
        require_host_key=cfg.ssh_require_host_key,
        connect_timeout_secs=connect_timeout_secs,
    )
    if as_json:
        _echo_json({"name": result.name, "nix_version": result.nix_version})
        return
    disabled = "" if builder.enabled else " (disabled in the config)"
    click.echo(f"{result.name}: {result.nix_version}{disabled}")


# ---- the runner's database -----------------------------------------------------------------


@cli.group(context_settings=_CONTEXT)
def db() -> None:
    """The runner's database schema ([database] url in runner.toml)."""


_DB_CONFIG = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="runner.toml naming the database (keys overridable by BIGTENT_<SECTION>__<KEY>).",
)


@db.command("status", context_settings=_CONTEXT)
@_DB_CONFIG
@_json_option
@click.pass_context
def db_status(ctx: click.Context, config_path: Path | None, as_json: bool) -> None:
    """Show the schema revision of the database and what `db migrate` would apply.

    Exits 0 when the runner can start on it, 1 when it needs `bigtent db migrate` (or a newer
    bigtent)."""
    from bigtent.runner.db.migrate import SchemaState, display_url, inspect_database

    url = load_runner_config(config_path).database_url()
    report = _run(inspect_database(url))
    if as_json:
        _echo_json(
            {
                "database": display_url(url),
                "state": report.state,
                "current": report.current,
                "head": report.head,
                "pending": list(report.pending),
            }
        )
    else:
        click.echo(f"database: {display_url(url)}")
        click.echo(f"schema:   {report.current or '(none)'} (this bigtent: {report.head})")
        what = {
            SchemaState.CURRENT: "up to date",
            SchemaState.EMPTY: "empty: `bigtent db migrate` creates the schema",
            SchemaState.BEHIND: f"behind: `bigtent db migrate` applies {', '.join(report.pending)}",
            SchemaState.AHEAD: "newer than this bigtent: run the bigtent that migrated it",
        }[report.state]
        click.echo(f"state:    {what}")
    ctx.exit(0 if report.state is SchemaState.CURRENT else 1)


@db.command("migrate", context_settings=_CONTEXT)
@_DB_CONFIG
@_json_option
def db_migrate(config_path: Path | None, as_json: bool) -> None:
    """Create or upgrade the database schema to this bigtent's (never downgrades).

    Stop the runners first: they refuse to start on a schema other than their own."""
    from bigtent.runner.db.migrate import display_url, migrate_database

    url = load_runner_config(config_path).database_url()
    before, after = _run(migrate_database(url))
    if as_json:
        _echo_json({"database": display_url(url), "before": before, "after": after})
    elif before == after:
        click.echo(f"{display_url(url)}: schema already at {after}; nothing to do")
    elif before is None:
        click.echo(f"{display_url(url)}: schema created at {after}")
    else:
        click.echo(f"{display_url(url)}: schema migrated from {before} to {after}")


# ---- the runner's cache ----------------------------------------------------------------------


@cli.group("cache", context_settings=_CONTEXT)
def cache_group() -> None:
    """The runner's binary cache ([cache] in runner.toml)."""


@cache_group.command("verify", context_settings=_CONTEXT)
@_DB_CONFIG
@click.option(
    "--repair",
    is_flag=True,
    help="Forget the paths whose NAR file is missing or bad (and delete bad files), so they "
    "are built or uploaded again.",
)
@_json_option
@click.pass_context
def cache_verify(ctx: click.Context, config_path: Path | None, repair: bool, as_json: bool) -> None:
    """Check every narinfo's NAR file in the storage: there, of its size, of its hash.

    Exits 0 when every file is good (or, with --repair, every bad path was forgotten), 1 when
    some are bad. Safe while runners run; a runner may still serve a damaged file's narinfo
    it remembers until the next lookup finds the file deleted."""
    from bigtent.runner.cache.verify import cache_tables, verify_cache
    from bigtent.runner.components import open_storage
    from bigtent.runner.db.migrate import DATABASE_ERRORS, create_engine, database_unavailable

    config = load_runner_config(config_path)

    async def go() -> Any:
        engine = create_engine(config.database_url())
        try:
            storage = await open_storage(config)
            return await verify_cache(engine, storage, cache_tables(), repair=repair)
        except DATABASE_ERRORS as exc:
            failure = database_unavailable(exc)
            if failure is None:
                raise
            raise failure from exc
        finally:
            await engine.dispose()

    report = _run(go())
    if as_json:
        _echo_json(report.as_json())
    else:
        for bad in report.bad:
            click.echo(f"bad: {bad.path} ({bad.cache} cache): {bad.reason}")
        tail = f"; {report.forgotten} forgotten" if repair else ""
        click.echo(f"checked {report.checked} path(s): {len(report.bad)} bad{tail}")
    ctx.exit(0 if not report.bad or (repair and report.forgotten == len(report.bad)) else 1)


# ---- cache retention: pins and collection (docs/cache.md) ------------------------------------


def _bytes_text(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _store_path_arg(text: str) -> str:
    """A store path, or a local link to one (``./result``) resolved to it."""
    if text.startswith("/nix/store/"):
        return text
    resolved = os.path.realpath(text)
    if not resolved.startswith("/nix/store/"):
        raise UsageError(f"{text} is not a store path (nor a link to one)")
    return resolved


@cli.group(context_settings=_CONTEXT)
def pin() -> None:
    """Named pins: each keeps its paths' closures in the runner's cache."""


@pin.command("add", context_settings=_CONTEXT)
@click.argument("name")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option(
    "--keep-days",
    type=click.FloatRange(min=0, min_open=True, max=36500),
    help="Expire the pin after this many days [default: never].",
)
@_client_options
@_json_option
def pin_add(
    name: str,
    paths: tuple[str, ...],
    keep_days: float | None,
    runner_url: str,
    token_file: Path | None,
    ca_file: Path | None,
    as_json: bool,
) -> None:
    """Pin PATHs (store paths or links to them) as NAME, replacing an existing pin NAME
    (admin token)."""
    wanted = [_store_path_arg(p) for p in paths]
    got = _call(runner_url, token_file, ca_file, lambda c: c.add_pin(name, wanted, keep_days))
    if as_json:
        _echo_json(got.model_dump(mode="json"))
        return
    until = f" until {got.expires_at}" if got.expires_at else ""
    click.echo(f"pinned {len(got.paths)} path(s) as {got.name}{until}")
    for missing in got.missing:
        click.echo(f"not in the cache (yet): {missing}", err=True)


@pin.command("list", context_settings=_CONTEXT)
@_client_options
@_json_option
def pin_list(runner_url: str, token_file: Path | None, ca_file: Path | None, as_json: bool) -> None:
    """List the pins."""
    rows = _call(runner_url, token_file, ca_file, lambda c: c.fetch_pins())
    if as_json:
        _echo_json([p.model_dump(mode="json", exclude={"missing"}) for p in rows])
        return
    table = Table()
    for col in ("name", "paths", "created by", "created", "expires"):
        table.add_column(col)
    for p in rows:
        table.add_row(
            p.name,
            "\n".join(p.paths),
            p.created_by or "-",
            p.created_at or "-",
            p.expires_at or "never",
        )
    _console().print(table)


@pin.command("remove", context_settings=_CONTEXT)
@click.argument("name")
@_client_options
@_json_option
def pin_remove(
    name: str, runner_url: str, token_file: Path | None, ca_file: Path | None, as_json: bool
) -> None:
    """Remove pin NAME: its paths are collected like any others (admin token)."""
    _call(runner_url, token_file, ca_file, lambda c: c.remove_pin(name))
    if as_json:
        _echo_json({"removed": name})
    else:
        click.echo(f"removed pin {name}")


@cli.command("gc", context_settings=_CONTEXT)
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@_client_options
@_json_option
def gc_cmd(
    dry_run: bool, runner_url: str, token_file: Path | None, ca_file: Path | None, as_json: bool
) -> None:
    """Collect the runner's caches now: delete what no root keeps and nobody used within
    max_idle_days, and evict down to the quota (admin token)."""
    report = _call(runner_url, token_file, ca_file, lambda c: c.collect_garbage(dry_run=dry_run))
    if as_json:
        _echo_json(report)
        return
    verb = "would delete" if dry_run else "deleted"
    for name, part in report.get("caches", {}).items():
        for entry in part.get("paths", []):
            click.echo(f"{verb}: {entry['path']} ({name} cache, {entry['reason']})")
        if part.get("more_paths"):
            click.echo(f"... and {part['more_paths']} more in the {name} cache")
    for name, part in report.get("caches", {}).items():
        reasons = ", ".join(f"{n} {r}" for r, n in part.get("deleted_by_reason", {}).items())
        click.echo(
            f"{name} cache: {verb} {part.get('deleted', 0)} of {part.get('paths_before', 0)} "
            f"path(s) ({reasons}), {_bytes_text(part.get('bytes_freed'))} freed, "
            f"{_bytes_text(part.get('bytes_after'))} kept"
            + (", over quota with rooted paths alone" if part.get("over_quota") else "")
        )


# ---- services --------------------------------------------------------------------------------


@cli.command(context_settings=_CONTEXT)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="runner.toml (keys overridable by BIGTENT_<SECTION>__<KEY>).",
)
def runner(config_path: Path | None) -> None:
    """Run the runner: API, binary cache, scheduler and agent sessions."""
    cfg = load_runner_config(config_path)
    from bigtent.runner.http.app import serve

    _run(serve(cfg))


@cli.command(context_settings=_CONTEXT)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="agent.toml; flags override it.",
)
@click.option("--runner-url", metavar="URL", help="http(s)://host:port of the runner.")
@click.option("--name", help="Agent name [default: host name].")
@click.option(
    "--system",
    "systems",
    multiple=True,
    help="System to build for (repeatable, or comma-separated).",
)
@click.option(
    "--supported-feature", "supported", multiple=True, help="Repeatable, or comma-separated."
)
@click.option(
    "--mandatory-feature", "mandatory", multiple=True, help="Repeatable, or comma-separated."
)
@click.option("--max-jobs", type=click.IntRange(min=1), help="Steps run at once.")
@click.option("--speed-factor", type=click.FloatRange(min=0, min_open=True))
@click.option("--store", metavar="URI", help='Nix store, e.g. "local?root=/var/lib/a1".')
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Agent token file [default: $BIGTENT_AGENT_TOKEN].",
)
@click.option("--sandbox-path", "sandbox_paths", multiple=True, help="Extra sandbox path.")
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path), help="Runner CA.")
@click.option(
    "--client-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    help="mTLS: this agent's certificate (PEM).",
)
@click.option(
    "--client-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="mTLS: its key [default: in the certificate file].",
)
@click.option(
    "--executor",
    type=click.Choice(["serve", "realise"]),
    help="serve: long-lived nix-store --serve per slot [default]; realise: one per step.",
)
@click.option(
    "--skip-probe",
    is_flag=True,
    help="Do not build the start-up probe before registering (agent.probe = false).",
)
@click.option(
    "--min-free-bytes",
    type=click.IntRange(min=0),
    help="Collect the store (Nix's GC) when its free disk falls below this [default: 0, never].",
)
@click.option(
    "--target-free-bytes",
    type=click.IntRange(min=0),
    help="Free disk a collection aims for [default: twice --min-free-bytes].",
)
@click.option("--ephemeral", is_flag=True, help="One session only (architecture §4).")
@click.option(
    "--untrusted", is_flag=True, help="An untrusted venue: take only untrusted builds' steps."
)
@click.option("--max-builds", type=click.IntRange(min=1), help="Ephemeral: builds, then exit.")
@click.option("--max-idle-secs", type=click.FloatRange(min=0, min_open=True))
@click.option("--max-lifetime-secs", type=click.FloatRange(min=0, min_open=True))
@click.option(
    "--oidc",
    type=click.Choice([p.value for p in OidcProvider]),
    help="Present the CI job's OIDC ID token (github: from the Actions environment); "
    "implies --ephemeral.",
)
@click.option("--audience", help="Audience to request the ID token for (with --oidc).")
@click.option(
    "--launch-id",
    metavar="ID",
    envvar="BIGTENT_LAUNCH_ID",
    help="Launch id to report at register [env: BIGTENT_LAUNCH_ID].",
)
@click.pass_context
def agent(
    ctx: click.Context,
    config_path: Path | None,
    runner_url: str | None,
    name: str | None,
    systems: tuple[str, ...],
    supported: tuple[str, ...],
    mandatory: tuple[str, ...],
    max_jobs: int | None,
    speed_factor: float | None,
    store: str | None,
    work_dir: Path | None,
    token_file: Path | None,
    sandbox_paths: tuple[str, ...],
    ca_file: Path | None,
    client_cert: Path | None,
    client_key: Path | None,
    executor: str | None,
    skip_probe: bool,
    min_free_bytes: int | None,
    target_free_bytes: int | None,
    ephemeral: bool,
    untrusted: bool,
    max_builds: int | None,
    max_idle_secs: float | None,
    max_lifetime_secs: float | None,
    oidc: str | None,
    audience: str | None,
    launch_id: str | None,
) -> None:
    """Run a build agent that dials in to the runner."""
    overrides = agent_overrides(
        runner_url=runner_url,
        name=name,
        systems=tuple(split_comma_list(systems)),
        supported_features=tuple(split_comma_list(supported)),
        mandatory_features=tuple(split_comma_list(mandatory)),
        max_jobs=max_jobs,
        speed_factor=speed_factor,
        store=store,
        work_dir=work_dir,
        token_file=token_file,
        sandbox_paths=sandbox_paths,
        ca_file=ca_file,
        client_cert_file=client_cert,
        client_key_file=client_key,
        executor=executor,
        min_free_bytes=min_free_bytes,
        target_free_bytes=target_free_bytes,
        ephemeral=ephemeral,
        untrusted=untrusted,
        max_builds=max_builds,
        max_idle_secs=max_idle_secs,
        max_lifetime_secs=max_lifetime_secs,
        oidc=oidc,
        audience=audience,
        launch_id=launch_id,
    )
    if skip_probe:
        overrides.setdefault("agent", {})["probe"] = False
    cfg = load_agent_config(config_path, **overrides)
    from bigtent.agent.credentials import load_credentials
    from bigtent.agent.session import run_agent

    credentials = load_credentials(cfg.agent, os.environ, token_file_flag=token_file)
    ctx.exit(_run(run_agent(cfg, credentials)))


def agent_overrides(**flags: Any) -> dict[str, Any]:
    """Flags given on the command line as a config override (unset flags are left out)."""
    eph_keys = ("max_builds", "max_idle_secs", "max_lifetime_secs")
    section: dict[str, Any] = {}
    ephemeral: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None or value == () or value is False:
            continue
        if key == "ephemeral":
            continue
        if key in eph_keys:
            ephemeral[key] = value
        elif isinstance(value, tuple):
            section[key] = list(value)
        elif isinstance(value, Path):
            section[key] = str(value)
        else:
            section[key] = value
    if flags.get("ephemeral") or ephemeral:
        section["ephemeral"] = ephemeral
    return {"agent": section} if section else {}


@cli.command(context_settings=_CONTEXT)
@click.option("--agents", "n_agents", type=click.IntRange(min=0), default=2, show_default=True)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".bigtent"),
    show_default=True,
)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option(
    "--jobs", type=click.IntRange(min=1), default=2, show_default=True, help="Jobs per agent."
)
@click.option(
    "--host-tools",
    is_flag=True,
    help="Map the host's /bin, /usr, /lib, /lib64 into every agent's build sandbox.",
)
@click.pass_context
def up(
    ctx: click.Context, n_agents: int, state_dir: Path, port: int, jobs: int, host_tools: bool
) -> None:
    """Run a runner and N local agents on this machine (the embedded default)."""
    from bigtent.up import UpSettings, run_up

    settings = UpSettings(
        state_dir=state_dir.absolute(),
        agents=n_agents,
        port=port,
        jobs=jobs,
        host_tools=host_tools,
    )
    ctx.exit(_run(run_up(settings, say=click.echo)))


# The Nix CI commands (projects, evals, jobs) live in their own module.
from bigtent.cicli import register as _register_ci  # noqa: E402

_register_ci(cli)
