"""Waiting for capacity: which runnable steps no venue can take, why, and when they give up.
Pure code: no I/O, no clock.

A runnable step waits for a free slot as a rule. It *waits for capacity* when no venue that
could ever take it exists: no connected agent or configured SSH builder (of those the
scheduler counts as able to take work) and no autoscaler pool that could launch one offers
its system, its required features (and accepts none it does not require: mandatory
features), its trust and, for a venue scoped to repositories, one of its builds'
repositories. That is ``matching.eligible`` over every *offer*, ignoring load, backoff and
slots. Such a step is shown with a reason (``waiting_reason``) and, after
``scheduler.capacity_grace_secs`` without capacity, fails as ``unsupported``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from bigtent import humanize
from bigtent.runner.scheduler.matching import Requirement, VenueView, can_run, may_take

WAITING_PREFIX = "waiting for capacity: "


def waiting_reason(req: Requirement) -> str:
    """``waiting for capacity: no agent offers aarch64-linux (features: kvm)``."""
    text = f"{WAITING_PREFIX}no agent offers {req.system}"
    if req.features:
        text += f" (features: {', '.join(sorted(req.features))})"
    if not req.trusted:
        text += " for untrusted builds"
    return text


def unsupported_error(req: Requirement, waited_secs: float) -> str:
    """The error of a step that waited for capacity past the grace."""
    return f"{waiting_reason(req)}; gave up after {humanize.duration(waited_secs)}"


@dataclass(frozen=True, slots=True)
class Capable:
    """What the offers say about one requirement."""

    unscoped: bool
    """Some offer that can run it takes steps of any repository: every step of it is met."""
    scoped: tuple[VenueView, ...] = ()
    """The scoped offers that can run it, one per scope (only when not ``unscoped``): a step
    is met when one of them may take it (``matching.may_take``)."""

    @property
    def none(self) -> bool:
        """No offer can run it at all."""
        return not self.unscoped and not self.scoped


def capable(req: Requirement, offers: Iterable[VenueView]) -> Capable:
    """Which offers can run ``req`` (``matching.can_run``: system, features, trust)."""
    scoped: dict[frozenset[str], VenueView] = {}
    for offer in offers:
        if not can_run(offer, req):
            continue
        if offer.repositories is None:
            return Capable(True)
        scoped.setdefault(offer.repositories, offer)
    return Capable(False, tuple(scoped.values()))


def unmet_requirements(
    requirements: Iterable[Requirement], offers: Collection[VenueView]
) -> list[Requirement]:
    """The requirements no unscoped offer can run: only their steps may wait for capacity
    (a look at the kinds of offers per requirement, never at steps)."""
    return [req for req in requirements if not capable(req, offers).unscoped]


def step_is_met(cap: Capable, repositories: Collection[str | None]) -> bool:
    """Whether some offer may take a step of this requirement whose live builds are for
    ``repositories``."""
    return cap.unscoped or any(may_take(offer, repositories) for offer in cap.scoped)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The capacity verdict of one pass."""

    waiting: dict[int, float]
    """Step id -> since when it has been waiting for capacity (kept from the last pass, or
    now for a step that started waiting)."""
    unsupported: list[int]
    """Steps that waited past the grace: to fail as ``unsupported`` (sorted)."""
    next_deadline: float | None
    """When the first of the still-waiting steps reaches the grace."""


def assess(
    requirements: Iterable[Requirement],
    steps_of: Callable[[Requirement], Iterable[int]],
    offers: Collection[VenueView],
    repositories_of: Callable[[int], Collection[str | None]],
    previous: Mapping[int, float],
    now: float,
    grace_secs: float,
) -> Verdict:
    """Which runnable steps (``steps_of`` each of the ``requirements``) wait for capacity,
    since when, and which of them have waited ``grace_secs`` or longer.

    ``previous`` is the last pass's ``waiting``: a step that still waits keeps its start, one
    that is met again (a venue connected) leaves, and a new one starts now. Only the steps of
    requirements no unscoped offer can run are looked at (and their builds' repositories
    only when scoped offers can run them)."""
    waiting: dict[int, float] = {}
    for req in requirements:
        cap = capable(req, offers)
        if cap.unscoped:
            continue
        for sid in steps_of(req):
            if cap.none or not step_is_met(cap, repositories_of(sid)):
                waiting[sid] = previous.get(sid, now)
    unsupported = sorted(sid for sid, since in waiting.items() if now - since >= grace_secs)
    rest = [since + grace_secs for since in waiting.values() if now - since < grace_secs]
    return Verdict(waiting, unsupported, min(rest) if rest else None)
