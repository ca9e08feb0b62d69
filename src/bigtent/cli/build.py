"""``bigtent build``: evaluate targets as nix-build does, build them on the farm, fetch and
link the outputs (the flow is ``client/build.py``; what it shows, ``buildview.py``)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import click

from bigtent.apilimits import BUILD_DRVS_MAX, PRIORITY_MAX, PRIORITY_MIN
from bigtent.cli.buildview import RichBuildObserver, Stop, report_result, report_stop
from bigtent.cli.options import CONTEXT, ClientOptions, client_options, json_option, run
from bigtent.cli.output import emit
from bigtent.errors import BuildFailed, BuildTimedOut, Terminated, UsageError


@click.command(context_settings=CONTEXT)
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
@client_options
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
@json_option
def build(
    targets: tuple[str, ...],
    attrs: tuple[str, ...],
    expr: str | None,
    arg_exprs: tuple[tuple[str, str], ...],
    arg_strings: tuple[tuple[str, str], ...],
    include: tuple[str, ...],
    show_trace: bool,
    drvs: tuple[str, ...],
    runner: ClientOptions,
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
    from bigtent.client.build import BuildOptions, parse_duration, run_build
    from bigtent.client.follow import BuildTracker
    from bigtent.client.observer import BuildObserver, SilentObserver
    from bigtent.client.progress import PlainBuildObserver, StepLogStreams
    from bigtent.client.reports import build_report, failed_roots, job_labels
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
    client = runner.client()
    stop = Stop(cancel=cancel_on_exit)
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
            result = run(go(SilentObserver(logs)))
        elif plain:
            logs = StepLogStreams(client, err_line) if print_logs else None
            result = run(go(PlainBuildObserver(err_line, logs)))
        else:
            with RichBuildObserver() as observer:
                if print_logs:
                    logs = observer.logs = StepLogStreams(client, observer.print_log_line)
                result = run(go(observer))
    except (KeyboardInterrupt, asyncio.CancelledError, TimeoutError):
        if stop.reason is None:
            raise
        report_stop(stop, tracker, as_json, timeout)
        if stop.reason == "timeout":
            if tracker.build_id is None:
                raise BuildTimedOut(f"no build was created within {timeout}") from None
            raise BuildTimedOut(f"build {tracker.build_id} did not end within {timeout}") from None
        if stop.reason == "terminated":
            raise Terminated("terminated (SIGTERM)") from None
        raise KeyboardInterrupt from None
    emit(
        as_json,
        build_report(result.build, result.links, result.attempts, tracker.jobs),
        lambda: report_result(result, job_labels(tracker.jobs)),
    )
    if not result.succeeded:
        failed = failed_roots(result.build)
        raise BuildFailed(
            f"build {result.build.id} {result.build.state.value}: "
            f"{len(failed)} of {len(result.build.roots)} requested derivation(s) did not build"
        )


COMMANDS = (build,)
