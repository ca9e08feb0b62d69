"""What the client says about a build (pure): the progress line, attempt and capacity notices,
which roots failed, and the --json report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bigtent import humanize
from bigtent.apimodels import Build, BuildRoot, Step, StepAttempt, StepCounts, WaitingStep
from bigtent.client.printed import printed
from bigtent.client.progress import nothing_to_build
from bigtent.client.targets import Job
from bigtent.states import BuildState, StepState

if TYPE_CHECKING:
    from bigtent.client.outputs import ResultLink

BUILT_ROOT_STATES = frozenset({"succeeded", "cached"})
"""Root states meaning the requested derivation's outputs exist (``cached``: no step needed)."""


def summarize_progress(counts: StepCounts) -> str:
    """One line: ``3/10 steps done, 2 running, 5 waiting`` (plus failures when there are some)."""
    done = counts.succeeded + counts.failed + counts.cancelled
    parts = [f"{done}/{counts.total} steps done"]
    if counts.running:
        parts.append(f"{counts.running} running")
    waiting = counts.waiting + counts.runnable
    if waiting:
        parts.append(f"{waiting} waiting")
    if counts.failed:
        parts.append(f"{counts.failed} failed")
    if counts.cancelled:
        parts.append(f"{counts.cancelled} cancelled")
    return ", ".join(parts)


def progress_line(build: Build) -> str:
    """``summarize_progress`` of the build's counts, or for a build with no step at all
    ``nothing to build: all N outputs cached``."""
    return nothing_to_build(build) or summarize_progress(build.counts)


def failed_roots(build: Build) -> list[BuildRoot]:
    """The requested derivations that did not build (any root of a build that is not
    successful, unless its own state says it built)."""
    return [root for root in build.roots if root.state not in BUILT_ROOT_STATES]


def build_succeeded(build: Build) -> bool:
    """Success only when the build and every requested derivation built (architecture §7)."""
    return build.state is BuildState.SUCCEEDED and not failed_roots(build)


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def is_infrastructure_failure(attempt: StepAttempt) -> bool:
    """Whether the attempt failed for an infrastructure reason (retried up to
    ``scheduler.max_infra_attempts``), as the runner classifies outcomes."""
    # Imported here: the wire protocol's models cost every client command's start-up, and
    # only a build with a failed attempt asks this.
    from bigtent.protocol import Outcome
    from bigtent.runner.scheduler.leases import Disposition, classify

    try:
        outcome = Outcome(attempt.outcome)
    except ValueError:
        return False
    return classify(outcome).disposition is Disposition.RETRY


def attempt_notice(attempt: StepAttempt) -> str | None:
    """The line ``bigtent build`` prints for an attempt, or None for one not worth a line (a
    success, a build failure: the build's own report shows those). E.g. ``retrying hello-1.0
    (attempt 2/5 failed on agent-1: prepare_failure: error: ...; next try in 10 s)``. The
    wait is measured on the runner's clock (retry time minus finish time)."""
    if not is_infrastructure_failure(attempt):
        return None
    name = attempt.name or attempt.drv_path
    where = f" on {attempt.agent_name}" if attempt.agent_name else ""
    reason = ": ".join(x for x in (attempt.outcome, _first_line(attempt.error)) if x)
    what = f"attempt {attempt.attempt}/{attempt.max_attempts} failed{where}: {reason}"
    if attempt.retry_at is None:
        return f"giving up on {name} ({what}; no more tries)"
    wait = humanize.seconds_between(attempt.finished_at, attempt.retry_at)
    when = "at once" if wait is None or wait < 0.05 else f"in {humanize.duration(wait)}"
    return f"retrying {name} ({what}; next try {when})"


def job_states(build: Build, jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Each job (attribute path, target, .drv) with its root's state and outputs, in the
    order evaluated: the ``jobs`` of the ``--json`` document."""
    roots = {root.drv_path: root for root in build.roots}
    out = []
    for job in jobs:
        root = roots.get(job.drv_path)
        out.append(
            {
                **job.as_json(),
                "state": root.state if root is not None else None,
                "built": root is not None and root.state in BUILT_ROOT_STATES,
                "outputs": root.outputs if root is not None else {},
            }
        )
    return out


def job_labels(jobs: Sequence[Job]) -> dict[str, str]:
    """The name to show for each .drv path: its job's attribute path (several jobs naming one
    derivation are joined by ``, ``)."""
    labels: dict[str, list[str]] = {}
    for job in jobs:
        if job.attr is not None:
            labels.setdefault(job.drv_path, []).append(job.label)
    return {drv: ", ".join(names) for drv, names in labels.items()}


def build_report(
    build: Build,
    links: Sequence[ResultLink] = (),
    attempts: Sequence[StepAttempt] = (),
    jobs: Sequence[Job] = (),
) -> dict[str, Any]:
    """The ``--json`` document. ``attempts``: the attempt records seen while following;
    ``jobs``: what the targets evaluated to, each by its attribute path."""
    return {
        "build_id": str(build.id),
        "state": build.state.value,
        "succeeded": build_succeeded(build),
        "trusted": build.trusted,
        "repository": build.repository,
        "ref": build.ref,
        "created_at": build.created_at,
        "finished_at": build.finished_at,
        "outputs": {root.drv_path: root.outputs for root in build.roots},
        "roots": printed(build.roots),
        "failed_steps": printed(build.failed_steps),
        "waiting_for_capacity_count": build.waiting_for_capacity_count,
        "waiting_for_capacity": printed(build.waiting_for_capacity),
        "links": [{"link": link.link, "path": link.path} for link in links],
        "attempts": printed(attempts),
        "jobs": job_states(build, jobs),
    }


def capacity_summary(build: Build) -> str | None:
    """``2 waiting for capacity`` for the progress line, or None."""
    n = build.waiting_for_capacity_count
    return f"{n} waiting for capacity" if n else None


def waiting_line(step: WaitingStep) -> str:
    """``step 7 hello-arm: waiting for capacity: no agent offers aarch64-linux``."""
    return f"step {step.step_id} {step.name or step.drv_path}: {step.reason}"


def newly_waiting(build: Build, shown: set[tuple[int, str | None]]) -> list[WaitingStep]:
    """The build's steps waiting for capacity not yet in ``shown`` (step id, reason): each
    is reported once, and again only if its reason changes."""
    return [w for w in build.waiting_for_capacity if (w.step_id, w.reason) not in shown]


def pending_steps(steps: Sequence[Step]) -> list[Step]:
    """The steps that have not ended (waiting, runnable, assigned, building)."""
    return [s for s in steps if not _is_final_state(s.state)]


def _is_final_state(state: str) -> bool:
    try:
        return StepState(state).is_final
    except ValueError:
        return False


def pending_line(step: Step) -> str:
    """``step 7 hello-arm: runnable (waiting for capacity: no agent offers aarch64-linux)``."""
    text = f"step {step.id} {step.name or step.drv_path}: {step.state}"
    if step.waiting_reason:
        text += f" ({step.waiting_reason})"
    return text


def stop_report(
    build: Build | None,
    pending: Sequence[Step],
    *,
    reason: str,
    cancelled: bool,
    jobs: Sequence[Job] = (),
) -> dict[str, Any]:
    """The ``--json`` document of a client that stopped before the build ended:
    ``reason`` is ``timeout``, ``interrupted`` (Ctrl-C) or ``terminated`` (SIGTERM)."""
    doc: dict[str, Any] = (
        build_report(build, jobs=jobs) if build is not None else {"build_id": None}
    )
    doc.update(
        stopped=reason,
        cancelled=cancelled,
        pending=printed(pending),
    )
    return doc
