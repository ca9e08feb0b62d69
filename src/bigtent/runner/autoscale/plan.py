"""How many agents each autoscaler pool launches, and when launches expire: pure arithmetic
over a snapshot (docs/autoscaling.md). No I/O, no clock: ``now`` is an argument.

The unit of demand is one runnable step; the unit of supply is one slot. In three phases:

1. **Connected agents.** Runnable steps some pool could take are matched to the free slots of
   connected venues (pool agents and every other agent or SSH builder). What they can take is
   no demand: the dispatcher is about to give it to them.
2. **Pending launches.** What is left is matched to the slots of launches not registered yet
   (``max_jobs`` each): they are on their way. A pending launch whose agent is already
   connected is counted once, as a connected agent.
3. **New launches.** Each pool's deficit is the agents still needed for the rest it can take,
   ``ceil(steps / max_jobs)``; it launches ``min(deficit, max_inflight - pending)``, nothing
   while it cools down. Steps a launch will take are no demand for the next pool.

Matching is greedy in a total order, so the same snapshot gives the same answer however its
parts are ordered: the most constrained requirement first (fewest slots able to take it in that
phase, then more required features, then system, features and build scopes), each to the least
capable slot able to take it (fewest features, then fewest systems, then narrowest repository
scope, then the capability alphabetically), machine id (launch id, pool name) last.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from bigtent.runner.scheduler.matching import Requirement, VenueView, can_run
from bigtent.states import LaunchState

LAUNCH_ID_BYTES = 16
"""A launch id is 128 random bits (32 hex digits): it ties an agent to its pool's repository
scope, so it must not be guessable."""


def new_launch_id() -> str:
    return secrets.token_hex(LAUNCH_ID_BYTES)


# ---- trust: which steps a pool's agents may take ---------------------------------------------
@dataclass(frozen=True, slots=True)
class BuildScope:
    """What one build a step belongs to says about trust: its repository (None: a build that
    names none) and whether it is trusted (architecture §6)."""

    repository: str | None
    trusted: bool

    def sort_key(self) -> tuple[str, bool, bool]:
        return (self.repository or "", self.repository is None, self.trusted)


def may_take(
    scopes: Collection[BuildScope],
    allowed_repositories: Collection[str] | None,
    *,
    allow_untrusted: bool = False,
) -> bool:
    """Whether an agent scoped to ``allowed_repositories`` may take a step whose builds have
    these ``scopes`` (architecture §6, trust). ``None``: an unscoped venue (a token agent, an SSH
    builder) takes anything. A scoped one (a pool's agents: the pool's
    ``allowed_build_repositories``) takes a step when one of its builds is for an allowed
    repository and trusted (or ``allow_untrusted``); a build naming no repository admits no
    scoped agent.

    The one rule the autoscaler's demand uses; the trust branch's dispatcher rule is to call
    it (or replace it) with the same inputs.
    """
    if allowed_repositories is None:
        return True
    return any(
        s.repository is not None
        and s.repository in allowed_repositories
        and (s.trusted or allow_untrusted)
        for s in scopes
    )


# ---- the snapshot ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Work:
    """``count`` runnable steps with the same requirement and the same build scopes."""

    req: Requirement
    scopes: frozenset[BuildScope]
    count: int = 1


@dataclass(frozen=True, slots=True)
class ConnectedSlots:
    """A connected venue's free slots. ``scope`` None: it may take any step; otherwise the
    repositories it may build (a pool agent's pool). ``launch_id``: the launch it registered
    with, if any."""

    venue: VenueView
    scope: frozenset[str] | None = None
    launch_id: str | None = None


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What a pool's launched agents can do, and how many may be pending at once."""

    name: str
    systems: frozenset[str]
    supported_features: frozenset[str]
    mandatory_features: frozenset[str]
    max_jobs: int
    allowed_repositories: frozenset[str]
    max_inflight: int

    @property
    def view(self) -> VenueView:
        """One of its agents, as a venue with one free slot (for ``can_run``)."""
        return self.venue(self.name, 1)

    def venue(self, machine_id: str, free: int) -> VenueView:
        """A launched agent of this pool as a venue with ``free`` free slots."""
        return VenueView(
            machine_id,
            self.systems,
            self.supported_features,
            self.mandatory_features,
            max_jobs=free,
            running=0,
        )


@dataclass(frozen=True, slots=True)
class PendingLaunch:
    """A launch whose agent has not registered yet."""

    launch_id: str
    pool: str


@dataclass(frozen=True, slots=True)
class PoolPlan:
    """One pool's arithmetic in one pass (also what the API shows)."""

    pool: str
    demand: int
    """Runnable steps this pool could take that no connected free slot takes."""
    pending: int
    """Launches not registered yet (an already connected one is not counted)."""
    covered: int
    """Steps of that demand the pending launches will take."""
    deficit: int
    """Agents still needed for the rest this pool can take (after earlier pools' launches)."""
    launch: int
    """Launches to make now: ``min(deficit, max_inflight - pending)``, 0 while cooling down."""
    cooling_down: bool = False


# ---- matching ---------------------------------------------------------------------------------
_Class = tuple[Requirement, frozenset[BuildScope]]
_Capability = tuple[
    int, int, int, tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]
]
_HolderKey = tuple[_Capability, str]


@dataclass(slots=True)
class _Holder:
    """Free slots in one matching phase: a connected venue, a pending launch or a pool."""

    key: _HolderKey
    venue: VenueView
    scope: frozenset[str] | None
    free: int
    owner: str = ""
    """The pool a pending launch belongs to (phase 2's coverage per pool)."""

    def takes(self, cls: _Class) -> bool:
        return can_run(self.venue, cls[0]) and may_take(cls[1], self.scope)


def _holder(
    venue: VenueView, scope: frozenset[str] | None, free: int, ident: str, owner: str = ""
) -> _Holder:
    """Least capable first: fewest features offered, fewest systems, narrowest repository
    scope (unscoped last), then the capability itself (so equally capable holders are next to
    each other), then the id: keep the versatile slots for work only they can do."""
    offered = venue.supported_features | venue.mandatory_features
    width = len(scope) if scope is not None else 1 << 30
    capability: _Capability = (
        len(offered),
        len(venue.systems),
        width,
        tuple(sorted(venue.systems)),
        tuple(sorted(offered)),
        tuple(sorted(venue.mandatory_features)),
        tuple(sorted(scope or ())),
    )
    return _Holder((capability, ident), venue, scope, free, owner)


def _class_key(cls: _Class) -> tuple[str, tuple[str, ...], tuple[tuple[str, bool, bool], ...]]:
    req, scopes = cls
    return (req.system, tuple(sorted(req.features)), tuple(sorted(s.sort_key() for s in scopes)))


def _match(
    demand: Mapping[_Class, int], holders: Iterable[_Holder]
) -> tuple[dict[_Class, int], dict[str, int]]:
    """Greedy matching in the total order (module docstring). Returns what is left of
    ``demand`` and, per holder owner, how many steps its holders took.

    Neighbours in the order with the same capability and owner are merged first: the greedy
    pass takes the same from a run of equal holders whichever of them gives it, and a farm has
    far fewer kinds of venue than venues.
    """
    groups: list[_Holder] = []
    for h in sorted(holders, key=lambda h: h.key):
        last = groups[-1] if groups else None
        if last is not None and last.key[0] == h.key[0] and last.owner == h.owner:
            last.free += h.free
        else:
            groups.append(_Holder(h.key, h.venue, h.scope, h.free, h.owner))
    able = {cls: [h for h in groups if h.takes(cls)] for cls in demand}
    capacity = {cls: sum(h.free for h in able[cls]) for cls in demand}
    left = dict(demand)
    taken: dict[str, int] = {}
    for cls in sorted(demand, key=lambda c: (capacity[c], -len(c[0].features), _class_key(c))):
        for h in able[cls]:
            if left[cls] == 0:
                break
            if h.free == 0:
                continue
            n = min(left[cls], h.free)
            h.free -= n
            left[cls] -= n
            taken[h.owner] = taken.get(h.owner, 0) + n
    return {c: n for c, n in left.items() if n}, taken


def _pool_takes(pool: PoolSpec, cls: _Class) -> bool:
    return can_run(pool.venue(pool.name, 1), cls[0]) and may_take(cls[1], pool.allowed_repositories)


def _pool_key(pool: PoolSpec) -> _HolderKey:
    return _holder(pool.view, pool.allowed_repositories, 0, pool.name).key


def plan(
    work: Iterable[Work],
    connected: Iterable[ConnectedSlots],
    pools: Iterable[PoolSpec],
    pending: Iterable[PendingLaunch],
    now: float,
    cooldown_until: Mapping[str, float],
) -> tuple[PoolPlan, ...]:
    """The launches each pool makes now (module docstring), one ``PoolPlan`` per pool in name
    order. Inputs may come in any order and ``work`` may repeat a class: the answer is the
    same. Pending launches of unknown pools, and ones whose agent is connected (a
    ``ConnectedSlots.launch_id``), count for nothing."""
    pool_list = sorted({p.name: p for p in pools}.values(), key=_pool_key)
    by_name = {p.name: p for p in pool_list}
    slots = list(connected)
    here = {s.launch_id for s in slots if s.launch_id is not None}
    waiting = sorted(
        {
            item.launch_id: item
            for item in pending
            if item.pool in by_name and item.launch_id not in here
        }.values(),
        key=lambda item: item.launch_id,
    )
    classes: dict[_Class, int] = {}
    for w in work:
        if w.count > 0:
            cls = (w.req, w.scopes)
            classes[cls] = classes.get(cls, 0) + w.count
    # Which pools could take each class: computed once (a pass has few classes, many steps).
    takers = {c: {p.name for p in pool_list if _pool_takes(p, c)} for c in classes}
    wanted = {c: n for c, n in classes.items() if takers[c]}

    # Phase 1: connected free slots take what they can.
    left, _ = _match(
        wanted,
        (
            _holder(s.venue, s.scope, s.venue.free_slots, s.venue.machine_id)
            for s in slots
            if s.venue.free_slots > 0
        ),
    )
    demand = {p.name: sum(n for c, n in left.items() if p.name in takers[c]) for p in pool_list}

    # Phase 2: launches on their way take what they will be able to.
    pending_count = {p.name: 0 for p in pool_list}
    for item in waiting:
        pending_count[item.pool] += 1
    left, covered = _match(
        left,
        (
            _holder(
                by_name[item.pool].venue(item.launch_id, by_name[item.pool].max_jobs),
                by_name[item.pool].allowed_repositories,
                by_name[item.pool].max_jobs,
                item.launch_id,
                owner=item.pool,
            )
            for item in waiting
        ),
    )

    # Phase 3: each pool launches for the rest it can take, least capable pool first.
    plans: list[PoolPlan] = []
    for pool in pool_list:
        eligible = sum(n for c, n in left.items() if pool.name in takers[c])
        deficit = math.ceil(eligible / pool.max_jobs)
        cooling = cooldown_until.get(pool.name, 0.0) > now
        room = max(0, pool.max_inflight - pending_count[pool.name])
        launch = 0 if cooling else min(deficit, room)
        if launch:
            left, _ = _match(
                left,
                [
                    _holder(
                        pool.venue(pool.name, launch * pool.max_jobs),
                        pool.allowed_repositories,
                        launch * pool.max_jobs,
                        pool.name,
                    )
                ],
            )
        plans.append(
            PoolPlan(
                pool=pool.name,
                demand=demand[pool.name],
                pending=pending_count[pool.name],
                covered=covered.get(pool.name, 0),
                deficit=deficit,
                launch=launch,
                cooling_down=cooling,
            )
        )
    return tuple(sorted(plans, key=lambda p: p.pool))


# ---- launch lifecycle -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LaunchView:
    """A launch as the lifecycle rules see it."""

    launch_id: str
    pool: str
    created_at: float
    state: LaunchState


def expired(launches: Iterable[LaunchView], ttl_secs: Mapping[str, float], now: float) -> list[str]:
    """Pending launches whose agent has not registered within their pool's
    ``launch_ttl_secs`` (sorted ids). A launch of a pool no longer configured expires now."""
    out = []
    for launch in launches:
        if launch.state is not LaunchState.PENDING:
            continue
        ttl = ttl_secs.get(launch.pool)
        if ttl is None or launch.created_at + ttl <= now:
            out.append(launch.launch_id)
    return sorted(out)


def next_expiry(launches: Iterable[LaunchView], ttl_secs: Mapping[str, float]) -> float | None:
    """When the next pending launch expires (None: none pending)."""
    times = [
        launch.created_at + ttl_secs[launch.pool]
        for launch in launches
        if launch.state is LaunchState.PENDING and launch.pool in ttl_secs
    ]
    return min(times) if times else None


MAX_RETRY_AFTER_SECS = 3600.0
"""A Retry-After (or rate-limit reset) beyond this is taken as this: a bogus header must not
stop a pool for days."""


def cooldown_end(now: float, cooldown_secs: float, retry_after_secs: float | None) -> float:
    """After a failed dispatch: no dispatch before this time. At least ``cooldown_secs``; longer
    when GitHub asked for more (Retry-After, or the rate-limit reset), up to an hour."""
    wait = cooldown_secs
    if retry_after_secs is not None and retry_after_secs > 0:
        wait = max(wait, min(retry_after_secs, MAX_RETRY_AFTER_SECS))
    return now + wait


def claim_refusal(
    state: LaunchState,
    agent_machine_id: str | None,
    machine_id: str,
    workflow_repository: str | None,
    identity_repository: str | None,
) -> str | None:
    """Why an agent registering with a launch id does not become that launch's agent (None:
    it does). The launch's agent is the pool's: it gets the pool's repository scope, so only
    an OIDC agent of the pool's workflow repository may claim it, and only one machine ever
    (a reconnect of that machine is fine). A launch that expired or whose dispatch seemed to
    fail may still be claimed: its job started late, or the dispatch reached GitHub after all.
    """
    if workflow_repository is None:
        return "its pool is no longer configured"
    if identity_repository is None:
        return "the agent did not authenticate with an OIDC ID token"
    if identity_repository != workflow_repository:
        return (
            f"the agent's repository {identity_repository} is not the pool's workflow "
            f"repository {workflow_repository}"
        )
    if state is LaunchState.REGISTERED and agent_machine_id != machine_id:
        return "another agent already registered with it"
    return None


def dispatch_inputs(
    *,
    name: str,
    runner_url: str,
    audience: str,
    systems: Sequence[str],
    supported_features: Sequence[str],
    mandatory_features: Sequence[str],
    max_jobs: int,
    launch_id: str,
    bigtent_version: str,
) -> dict[str, str]:
    """The workflow inputs of one launch: strings only (``workflow_dispatch`` inputs are
    strings), lists comma-joined (the workflow splits, trims and drops empties)."""
    return {
        "name": name,
        "runner_url": runner_url,
        "audience": audience,
        "systems": ",".join(systems),
        "supported_features": ",".join(supported_features),
        "mandatory_features": ",".join(mandatory_features),
        "max_jobs": str(max_jobs),
        "launch_id": launch_id,
        "bigtent_version": bigtent_version,
    }
