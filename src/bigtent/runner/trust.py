"""Trust scoping decisions (architecture §6, docs/security.md). Pure code.

- Which builds are trusted: ``build_is_trusted`` (who created it, for which ref, and whether
  it asked to be).
- Which venues are trusted, and which build repositories they serve: ``VenueScope``, from an
  agent's own request (``token_venue_scope``) or its OIDC rule (``oidc_venue_scope``).
- Which steps an untrusted build makes and which live trusted steps it shares:
  ``untrusted_work``.

The scheduler's matching (``scheduler/matching.py``: ``can_run``, ``may_take``) applies the
venue scopes to steps.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from bigtent.config import OidcIssuerSection, Role

ANY_REPOSITORY = "*"
"""In ``build_repositories``: builds of any repository, and builds without one."""

_REVIEW_NAMESPACES = frozenset({"pull", "merge-requests", "pull-requests", "changes"})
"""The first component (after ``refs/`` and ``remotes/``) of the refs forges use for code
under review: GitHub, Forgejo and Gitea ``refs/pull/N/head|merge``, GitLab
``refs/merge-requests/N/head``, Bitbucket ``refs/pull-requests/N/from``, Gerrit
``refs/changes/NN/N/P``."""


def is_pull_request_ref(ref: str | None) -> bool:
    """Whether ``ref`` names code proposed for review rather than a branch or tag of the
    repository (anyone who can open a pull request can write to such a ref).

    ``refs/pull/…``, ``refs/merge-requests/…``, ``refs/pull-requests/…`` and
    ``refs/changes/…``; also without the ``refs/`` prefix and as remote-tracking refs
    (``refs/remotes/pull/1/merge``, as ``actions/checkout`` fetches them). Case-insensitive,
    since some forges and tools spell refs loosely. No ref (None or empty) is not one.
    """
    if not ref:
        return False
    parts = [p for p in ref.strip().lower().split("/") if p]
    if parts[:1] == ["refs"]:
        parts = parts[1:]
    if parts[:1] == ["remotes"]:
        parts = parts[1:]
        if parts and parts[0] not in _REVIEW_NAMESPACES:
            parts = parts[1:]  # refs/remotes/origin/pull/…
    return bool(parts) and parts[0] in _REVIEW_NAMESPACES


def build_is_trusted(*, requested: bool, role: Role, token_trusted: bool, ref: str | None) -> bool:
    """architecture §6: a build is trusted only when it asked to be, its creator is an ``admin``
    token or a client token marked trusted, and it is not for a pull request ref."""
    if not requested:
        return False
    if role is not Role.ADMIN and not (role is Role.CLIENT and token_trusted):
        return False
    return not is_pull_request_ref(ref)


@dataclass(frozen=True, slots=True)
class VenueScope:
    """Which steps a venue may take: of its trust only, and (when ``repositories`` is not
    None) only steps with a live build for one of those repositories."""

    trusted: bool = True
    repositories: frozenset[str] | None = None


def token_venue_scope(*, untrusted: bool) -> VenueScope:
    """A token agent is trusted unless it asked to be untrusted (``[agent] untrusted``); it
    takes builds of any repository."""
    return VenueScope(trusted=not untrusted)


def oidc_venue_scope(rule: OidcIssuerSection) -> VenueScope:
    """An OIDC agent is trusted unless its rule says ``allow_untrusted = true`` (then it is an
    untrusted venue, taking untrusted steps only); it serves the builds of the rule's
    ``build_repositories`` (default: its ``repositories``), any with ``"*"``."""
    repos = rule.build_repositories if rule.build_repositories is not None else rule.repositories
    if ANY_REPOSITORY in repos:
        return VenueScope(trusted=not rule.allow_untrusted)
    return VenueScope(trusted=not rule.allow_untrusted, repositories=frozenset(repos))


@dataclass(frozen=True, slots=True)
class UntrustedWork:
    """How an untrusted build uses the derivations planned for it."""

    shared: frozenset[str]
    """Derivations whose live trusted step it joins (their outputs go to the main cache)."""
    own: frozenset[str]
    """Derivations it makes (or joins) untrusted steps for."""


def untrusted_work(
    deps: Mapping[str, Sequence[str]], roots: Iterable[str], live_trusted: Collection[str]
) -> UntrustedWork:
    """Walk the plan of an untrusted build down from its roots (``deps``: each planned .drv
    to the planned .drvs it needs). A derivation with a live trusted step is shared and its
    inputs are not walked (that step has its own trusted dependencies); every other one gets
    an untrusted step and its inputs are walked. Planned derivations reached only below shared
    ones are not needed. So trusted steps keep depending on trusted steps only, and untrusted
    steps may depend on either."""
    shared: set[str] = set()
    own: set[str] = set()
    stack = [r for r in roots if r in deps]
    while stack:
        drv = stack.pop()
        if drv in shared or drv in own:
            continue
        if drv in live_trusted:
            shared.add(drv)
            continue
        own.add(drv)
        stack.extend(d for d in deps[drv] if d in deps)
    return UntrustedWork(frozenset(shared), frozenset(own))
