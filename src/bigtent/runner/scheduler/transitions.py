"""How a step's attempt ends, decided as plain values (pure: no I/O, no mutation).

``end_attempt`` takes the step as the working copy has it, the venue that ran it and what
happened, and returns an ``AttemptEnd``: the step's new state and row, the venue's health
after it, the dependents that become runnable or fail with it, and the attempt's record. The
scheduler writes that in one transaction (``persist``) and only then applies it to its
memory, so a failed transaction leaves memory as it was. ``build_endings`` then says which
builds end once the steps that became final are known (on a shared database another runner
may have moved some dependents on first).

A new build (or a restart) is decided the same way: ``admit_verdict`` for each derivation,
``admitted`` for how the queued steps start, gathered in an ``AdmissionPlan`` that memory
takes only after its transaction committed.

The outcome is classified once (``leases.classify``, like Hydra's ``updateWithBuildResult``).
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from bigtent import protocol as p
from bigtent.config import SchedulerSection
from bigtent.runner.scheduler.health import became_unhealthy
from bigtent.runner.scheduler.leases import (
    Disposition,
    attempt_retry_at,
    backoff_secs,
    classify,
    is_cached_failure,
    next_retry_at,
)
from bigtent.runner.scheduler.model import MAX_LAST_ERROR_CHARS, REDO_STATES, ActiveBuild, Venue
from bigtent.runner.scheduler.steps import StepNode, build_outcome, dependents_closure
from bigtent.runner.scheduler.sync import LostRace
from bigtent.states import BuildState, StepState

MAX_ERROR_CHARS = 8000
"""A step's (and an attempt's) error is stored up to this long."""
_PENDING = (StepState.WAITING, StepState.RUNNABLE)
"""States a dependent fails from when one of its dependencies fails."""


@dataclass(frozen=True, slots=True)
class VenueHealth:
    """A venue's failure count, backoff, cooldown and last error after an attempt ended."""

    consecutive_failures: int
    backoff_until: float
    cooldown_until: float
    last_error: str
    succeeded: int
    """1 when the attempt succeeded (the agent row's counters), else 0."""
    failed: int
    """1 when the attempt failed the derivation."""
    infra: int
    """1 when the attempt was an infrastructure failure counted against the venue."""
    became_unhealthy: bool
    """This failure made the venue unhealthy (one step at a time until one succeeds)."""


@dataclass(frozen=True, slots=True)
class AttemptEnd:
    """What ending one attempt of a step does."""

    step_id: int
    attempt: int
    """The number of the attempt that ended (1 for the first)."""
    outcome: p.Outcome
    error: str
    """The attempt's error as reported (its record keeps it)."""
    disposition: Disposition
    counts_against_venue: bool
    state: StepState
    attempts: int
    """Infrastructure attempts so far (the step row's ``attempts``)."""
    not_before: float | None
    row: Mapping[str, Any]
    """The step row's new values."""
    retry_at: float | None
    """When the step is tried again (the attempt record), None when it is final."""
    leased: bool
    """Whether the attempt held a lease (not so for a step that never left the queue)."""
    venue: VenueHealth | None
    note: str | None
    """A line for the step's log telling why the attempt ended (retries only)."""
    promote: tuple[int, ...]
    """Waiting dependents whose last unfinished dependency this was: runnable now."""
    fail: tuple[int, ...]
    """Waiting or runnable steps that depend on this one, all the way up: they fail too."""
    dependency_error: str

    @property
    def final(self) -> bool:
        return self.state.is_final


def holds_lease(node: StepNode, lease_id: str) -> bool:
    """Whether ``lease_id`` is the step's current lease: only then does a message about it
    count. A result for any other lease (an expired one, one given back, or one the step
    never had) is acknowledged and ignored, so a step finishes exactly once (architecture
    §3)."""
    return node.lease_id == lease_id and node.state.is_leased


def end_attempt(
    node: StepNode,
    nodes: Mapping[int, StepNode],
    venue: Venue | None,
    outcome: p.Outcome,
    error: str,
    result: p.Result | None,
    now: float,
    config: SchedulerSection,
    rand: Callable[[], float],
) -> AttemptEnd:
    """Decide how ``node``'s current attempt ends with ``outcome``. ``rand`` gives the jitter
    of an infrastructure retry's backoff (called once, only for such a retry)."""
    policy = classify(outcome)
    attempt = node.attempts + 1
    attempts = node.attempts
    not_before = node.not_before
    row: dict[str, Any] = dict(
        outcome=outcome,
        error=error[:MAX_ERROR_CHARS] or None,
        lease_id=None,
        lease_expires_at=None,
    )
    if result is not None:
        row.update(
            exit_code=result.exit_code,
            prepare_secs=result.timings.prepare_secs,
            build_secs=result.timings.build_secs,
            upload_secs=result.timings.upload_secs,
        )
    note: str | None = None
    promote: tuple[int, ...] = ()
    fail: tuple[int, ...] = ()
    match policy.disposition:
        case Disposition.SUCCEED:
            state = StepState.SUCCEEDED
            row.update(finished_at=now)
            promote = tuple(
                d
                for d in sorted(node.dependents)
                if (dep := nodes.get(d)) is not None
                and dep.state is StepState.WAITING
                and dep.deps <= {node.id}
            )
        case Disposition.FAIL:
            # A build failure is final and cached (failed_at) for the failure cache's TTL;
            # infrastructure failures (below) never are.
            state = StepState.FAILED
            row.update(finished_at=now, failed_at=now)
        case Disposition.RETRY:
            where = f" on {venue.name}" if venue is not None else ""
            reason = next((ln for ln in error.splitlines() if ln.strip()), "")
            note = f"[bigtent: attempt {attempt}{where}: {outcome}: {reason}]"
            attempts += 1
            if attempts >= config.max_infra_attempts:
                state = StepState.FAILED
                row.update(
                    finished_at=now,
                    attempts=attempts,
                    error=(
                        f"infrastructure failure after {attempts} attempts; last: "
                        f"{outcome}: {error}"
                    )[:MAX_ERROR_CHARS],
                )
            else:
                state = StepState.RUNNABLE
                not_before = next_retry_at(
                    attempts, now, config.retry_base_secs, config.retry_max_secs, rand()
                )
                row.update(attempts=attempts, not_before=not_before)
        case Disposition.REQUEUE:
            state = StepState.RUNNABLE
    row["state"] = state
    if state is StepState.FAILED:
        fail = tuple(
            sorted(
                sid for sid in dependents_closure(nodes, node.id) if nodes[sid].state in _PENDING
            )
        )
    return AttemptEnd(
        step_id=node.id,
        attempt=attempt,
        outcome=outcome,
        error=error,
        disposition=policy.disposition,
        counts_against_venue=policy.counts_against_venue,
        state=state,
        attempts=attempts,
        not_before=not_before,
        row=row,
        retry_at=attempt_retry_at(state, not_before, now),
        leased=node.lease_id is not None,
        venue=None if venue is None else venue_health(venue, outcome, error, now, config),
        note=note,
        promote=promote,
        fail=fail,
        dependency_error=f"dependency {node.drv_path} failed",
    )


def venue_health(
    venue: Venue, outcome: p.Outcome, error: str, now: float, config: SchedulerSection
) -> VenueHealth:
    """The venue's health after an attempt on it ended with ``outcome`` (architecture §4):
    an infrastructure failure counts against it (backoff doubling per consecutive failure),
    an abort cools it down briefly (so it does not get the step straight back in a loop),
    anything else resets its count."""
    policy = classify(outcome)
    failures, backoff_until = venue.consecutive_failures, venue.backoff_until
    cooldown_until, last_error = venue.cooldown_until, venue.last_error
    if policy.counts_against_venue:
        failures += 1
        backoff_until = now + backoff_secs(
            failures, config.agent_backoff_base_secs, config.agent_backoff_max_secs
        )
        last_error = error[:MAX_LAST_ERROR_CHARS]
    elif policy.disposition is Disposition.REQUEUE:
        cooldown_until = now + config.refuse_cooldown_secs
    else:
        failures, backoff_until = 0, 0.0
    return VenueHealth(
        consecutive_failures=failures,
        backoff_until=backoff_until,
        cooldown_until=cooldown_until,
        last_error=last_error,
        succeeded=int(policy.disposition is Disposition.SUCCEED),
        failed=int(policy.disposition is Disposition.FAIL),
        infra=int(policy.counts_against_venue),
        became_unhealthy=policy.counts_against_venue
        and became_unhealthy(failures, config.unhealthy_after_failures),
    )


def build_endings(
    builds: Mapping[int, ActiveBuild],
    nodes: Mapping[int, StepNode],
    finished: Mapping[int, StepState],
    incomplete: Iterable[int] = (),
    also: Iterable[int] = (),
) -> dict[int, BuildState]:
    """The builds that end now that the steps in ``finished`` (id -> its new final state; in
    memory they still have their old one) became final, with each one's outcome: a build
    ends once every member step is final, and its outcome is its roots' (keep going). A build
    still being admitted (``incomplete``) does not end. ``also``: builds to look at besides
    those of ``finished`` (their steps may have become final elsewhere: a catch-up)."""
    skip = set(incomplete)
    newly: dict[int, int] = {}
    for sid in finished:
        node = nodes.get(sid)
        if node is not None and not node.state.is_final:
            for bid in node.builds:
                newly[bid] = newly.get(bid, 0) + 1
    endings: dict[int, BuildState] = {}
    for bid in sorted(newly.keys() | set(also)):
        build = builds.get(bid)
        if build is None:
            continue
        outcome = build_ending(build, nodes, finished, newly.get(bid, 0), incomplete=bid in skip)
        if outcome is not None:
            endings[bid] = outcome
    return endings


def build_ending(
    build: ActiveBuild,
    nodes: Mapping[int, StepNode],
    finished: Mapping[int, StepState] | None = None,
    newly_final: int = 0,
    *,
    incomplete: bool = False,
) -> BuildState | None:
    """How ``build`` ends, if it ends now: once every member step is final (``newly_final``
    of them just became so, their new states in ``finished``), with its roots' outcome (keep
    going). None while it goes on, is still being admitted (``incomplete``), or already
    ended."""
    if incomplete or build.unfinished - newly_final > 0:
        return None
    outcome = build_outcome(root_states(build, nodes, finished or {}))
    if outcome is None or build.state.is_final:
        return None
    return outcome


def root_states(
    build: ActiveBuild, nodes: Mapping[int, StepNode], finished: Mapping[int, StepState]
) -> list[StepState | None]:
    """The states of a build's roots (None: cached, or no longer in memory), with the
    ``finished`` ones' new states."""
    return [
        finished.get(sid, nodes[sid].state) if sid is not None and sid in nodes else None
        for sid in build.roots.values()
    ]


@dataclass(frozen=True, slots=True)
class Cancellation:
    """What cancelling a build does to its steps."""

    build_id: int
    victims: tuple[int, ...]
    """Its steps that are not final and that no other active build needs: cancelled."""
    aborted: Mapping[int, int]
    """Of those, the leased ones (step id -> the number of its attempt that ends, aborted)."""


def cancel(
    build: ActiveBuild, nodes: Mapping[int, StepNode], builds: Mapping[int, ActiveBuild]
) -> Cancellation:
    """Cancel ``build``: its steps that no other active build needs stop or never start."""
    victims = tuple(
        sid
        for sid in sorted(build.steps)
        if (node := nodes.get(sid)) is not None
        and not node.state.is_final
        and not any(b != build.id for b in node.builds if b in builds)
    )
    return Cancellation(
        build.id,
        victims,
        {sid: nodes[sid].attempts + 1 for sid in victims if nodes[sid].state.is_leased},
    )


@dataclass(frozen=True, slots=True)
class Reattach:
    """What a venue's (re)connection does to the leases of its machine."""

    kept: tuple[int, ...]
    """Reported running steps whose leases it keeps (renewed), in the report's order."""
    lost: tuple[int, ...]
    """Its machine's other leased steps: it no longer runs them, so they expire now (an
    infrastructure retry at the next pass)."""


def reattach(
    machine_id: str,
    reported: Iterable[tuple[int, str]],
    nodes: Mapping[int, StepNode],
    leased: Iterable[StepNode],
    running: Collection[int] = (),
) -> Reattach:
    """A venue of ``machine_id`` attached, reporting (step id, lease id) of what it runs;
    ``leased`` are the leased steps, ``running`` the ones it already holds here."""
    kept = tuple(
        sid
        for sid, lease in reported
        if (node := nodes.get(sid)) is not None
        and holds_lease(node, lease)
        and node.venue == machine_id
    )
    holds = set(kept).union(running)
    lost = tuple(
        n.id for n in leased if n.state.is_leased and n.venue == machine_id and n.id not in holds
    )
    return Reattach(kept, lost)


class Admit(StrEnum):
    """What a new build (or a restart) does about a derivation it needs."""

    JOIN = "join"
    """An active step here: the build joins it, whatever it does now."""
    CACHED = "cached"
    """Its build failure is within the failure cache's TTL: the step fails at once."""
    CREATE = "create"
    """No step yet: a new one."""
    REQUEUE = "requeue"
    """A finished step that did not succeed: queued again in place, with a fresh log."""


@dataclass(frozen=True, slots=True)
class StoredStep:
    """A derivation's step as its (locked) row has it."""

    state: StepState
    outcome: str | None
    failed_at: float | None


def admit_verdict(
    drv_path: str, here: StepState | None, stored: StoredStep | None, now: float, ttl_secs: float
) -> Admit:
    """Decide about a derivation's step from the working copy (``here``: its step's state,
    None when there is none) and the row. Joining a step that is active here is right
    whatever the step does now; but queueing a step again (or creating it) needs the row to
    agree that it is finished: otherwise another runner changed it first, a LostRace (read
    again, retry). A step active in the database and unknown here belongs to a build this
    runner has not heard of yet."""
    if here is not None and here not in REDO_STATES:
        return Admit.JOIN
    if stored is None:
        if here is not None:
            raise LostRace(f"the step of {drv_path} is gone from the database")
        return Admit.CREATE
    if here is None and not stored.state.is_final:
        raise LostRace(f"the step of {drv_path} is {stored.state} in the database, unknown here")
    if here is not None and stored.state is not here:
        raise LostRace(f"the step of {drv_path} is {stored.state} in the database, {here} here")
    if stored.state is StepState.FAILED and is_cached_failure(
        stored.outcome, stored.failed_at, now, ttl_secs
    ):
        return Admit.CACHED
    return Admit.REQUEUE


_FAILED_DEP = (StepState.FAILED, StepState.DEPENDENCY_FAILED, StepState.CANCELLED)
"""States of a dependency that fail a step queued on it."""


@dataclass
class Admitted:
    """How the steps an admission queued start (``admitted``): the edges the working copy
    gains, and which queued steps fail at once or are runnable at once."""

    waits: dict[int, set[int]]
    """Step -> the dependencies it waits for (those that have not succeeded)."""
    links: list[tuple[int, int]]
    """(step, dependency) pairs recorded in memory: the dependency's dependents gain the step."""
    failed: dict[int, str]
    """Queued steps that fail at once, each with its error (a dependency failed)."""
    runnable: list[int]
    """Queued steps without a dependency to wait for."""


def admitted(
    pairs: Iterable[tuple[int, int]],
    queued: Iterable[int],
    state_of: Callable[[int], StepState],
    drv_of: Callable[[int], str],
) -> Admitted:
    """Decide how an admission's steps start. ``pairs`` are the plan's (step, dependency)
    edges, ``queued`` the steps it queues (new or queued again: waiting, without
    dependencies yet; dependencies first), ``state_of`` every step's state as the admission
    leaves it (queued ones waiting). A step that already runs (or ran) keeps the dependencies
    it started with: no edge, so a later failure of the new dependency cannot fail it. A
    queued step on a failed dependency fails at once (and what is queued on it with it)."""
    waits: dict[int, set[int]] = {}
    links: list[tuple[int, int]] = []
    for s, d in pairs:
        if state_of(s) is not StepState.WAITING:
            continue
        if state_of(d) is not StepState.SUCCEEDED:
            waits.setdefault(s, set()).add(d)
        links.append((s, d))
    failed: dict[int, str] = {}
    runnable: list[int] = []
    for sid in queued:
        deps = waits.get(sid, set())
        failed_dep = next(
            (
                d
                for d in sorted(deps)
                if (StepState.DEPENDENCY_FAILED if d in failed else state_of(d)) in _FAILED_DEP
            ),
            None,
        )
        if failed_dep is not None:
            failed[sid] = f"dependency {drv_of(failed_dep)} failed"
        elif not deps:
            runnable.append(sid)
    return Admitted(waits, links, failed, runnable)


@dataclass
class AdmissionPlan:
    """An admission decided and written (``Admission._admit``), applied to memory only once
    its transaction committed (``Admission._apply_admission``)."""

    build_id: int
    heights: Mapping[str, int]
    ids: dict[str, int]
    """.drv path -> step id of every step of the admission so far (its own map, not the
    working copy's: a failed admission is discarded whole)."""
    new: list[StepNode] = field(default_factory=list)
    """Steps memory does not have: queued ones and cached failures."""
    known: list[StepNode] = field(default_factory=list)
    """Dependencies admitted earlier that left memory meanwhile, as their rows have them."""
    requeued: list[StepNode] = field(default_factory=list)
    """Finished steps in memory queued again in place."""
    fresh: list[int] = field(default_factory=list)
    """The steps queued (new or again), dependencies first."""
    touched: list[int] = field(default_factory=list)
    """Steps in memory joined, or failed at once as cached failures."""
    cached: list[int] = field(default_factory=list)
    """Cached failures memory does not have."""
    pairs: list[tuple[int, int]] = field(default_factory=list)
    """The plan's (step, dependency) edges."""
    chunk: list[int] = field(default_factory=list)
    """The planned steps, in plan order."""
    resets: list[dict[str, Any]] = field(default_factory=list)
    """The rows of finished steps queued again (their logs start afresh)."""
    decided: Admitted = field(default_factory=lambda: Admitted({}, [], {}, []))

    def view(self, nodes: dict[int, StepNode]) -> ChainMap[int, StepNode]:
        """``nodes`` (not copied, not changed) with the steps this plan brings into memory."""
        return ChainMap({n.id: n for n in [*self.new, *self.known]}, nodes)

    def states(self) -> dict[int, StepState]:
        """The new states of the steps this plan queues."""
        after = dict.fromkeys(self.fresh, StepState.WAITING)
        after.update(dict.fromkeys(self.decided.failed, StepState.DEPENDENCY_FAILED))
        after.update(dict.fromkeys(self.decided.runnable, StepState.RUNNABLE))
        return after
