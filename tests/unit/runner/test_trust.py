"""Trust scoping decisions (architecture §6): which builds are trusted, which venues are, and which
steps an untrusted build makes or shares."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.config import OidcIssuerSection, Role
from bigtent.runner.trust import (
    VenueScope,
    build_is_trusted,
    is_pull_request_ref,
    oidc_venue_scope,
    token_venue_scope,
    untrusted_work,
)


# ---- pull request refs -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ref",
    [
        "refs/pull/12/merge",
        "refs/pull/12/head",
        "refs/merge-requests/7/head",
        "refs/merge-requests/7/merge",
        "refs/pull-requests/3/from",
        "refs/changes/45/12345/2",
        "pull/12/merge",
        "merge-requests/7/head",
        "refs/remotes/pull/12/merge",
        "refs/remotes/origin/pull/12/head",
        "REFS/PULL/1/MERGE",
        " refs/pull/1/head",
        "refs//pull/1/head",
    ],
)
def test_pull_request_refs(ref: str) -> None:
    assert is_pull_request_ref(ref)


@pytest.mark.parametrize(
    "ref",
    [
        None,
        "",
        "refs/heads/main",
        "refs/heads/pull/12/merge",  # a branch named "pull/…" is a branch
        "refs/tags/v1.0",
        "refs/heads/merge-requests",
        "main",
        "refs/heads/gh-readonly-queue/main/pr-1-abc",  # GitHub's merge queue: protected
        "refs/remotes/origin/main",
    ],
)
def test_other_refs_are_not_pull_requests(ref: str | None) -> None:
    assert not is_pull_request_ref(ref)


# ---- build trust -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("role", "token_trusted", "ref", "requested", "expected"),
    [
        pytest.param(Role.ADMIN, False, None, True, True, id="admin"),
        pytest.param(Role.ADMIN, False, "refs/heads/main", True, True, id="admin-branch"),
        pytest.param(Role.CLIENT, True, "refs/heads/main", True, True, id="trusted-client"),
        pytest.param(Role.CLIENT, True, None, True, True, id="trusted-client-no-ref"),
        pytest.param(Role.CLIENT, False, "refs/heads/main", True, False, id="plain-client"),
        pytest.param(Role.CLIENT, True, "refs/pull/1/merge", True, False, id="pull-request"),
        pytest.param(Role.ADMIN, False, "refs/merge-requests/2/head", True, False, id="admin-mr"),
        pytest.param(Role.ADMIN, False, None, False, False, id="admin-asks-untrusted"),
        pytest.param(Role.CLIENT, True, None, False, False, id="client-asks-untrusted"),
        pytest.param(Role.AGENT, True, None, True, False, id="agent-token"),
    ],
)
def test_build_trust(
    role: Role, token_trusted: bool, ref: str | None, requested: bool, expected: bool
) -> None:
    got = build_is_trusted(requested=requested, role=role, token_trusted=token_trusted, ref=ref)
    assert got is expected


_REFS = st.one_of(
    st.none(),
    st.sampled_from(["refs/heads/main", "refs/pull/1/merge", "refs/tags/v1", "pull/2/head"]),
    st.text(max_size=30),
)


@given(
    role=st.sampled_from(list(Role)),
    token_trusted=st.booleans(),
    ref=_REFS,
    requested=st.booleans(),
)
def test_a_trusted_build_needs_every_condition(
    role: Role, token_trusted: bool, ref: str | None, requested: bool
) -> None:
    trusted = build_is_trusted(requested=requested, role=role, token_trusted=token_trusted, ref=ref)
    if trusted:
        assert requested
        assert role is Role.ADMIN or (role is Role.CLIENT and token_trusted)
        assert not is_pull_request_ref(ref)
    # Asking for less never gives more.
    assert not build_is_trusted(requested=False, role=role, token_trusted=token_trusted, ref=ref)
    if token_trusted is False:
        assert trusted <= build_is_trusted(
            requested=requested, role=role, token_trusted=True, ref=ref
        )


# ---- venue scopes ------------------------------------------------------------------------------
def rule(**values: Any) -> OidcIssuerSection:
    base: dict[str, Any] = {
        "issuer": "https://token.actions.githubusercontent.com",
        "audiences": ["bigtent"],
        "repositories": ["acme/widgets"],
    }
    return OidcIssuerSection(**(base | values))


def test_token_agents_are_trusted_unless_they_ask() -> None:
    assert token_venue_scope(untrusted=False) == VenueScope(trusted=True, repositories=None)
    assert token_venue_scope(untrusted=True) == VenueScope(trusted=False, repositories=None)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param({}, VenueScope(True, frozenset({"acme/widgets"})), id="default"),
        pytest.param(
            {"allow_untrusted": True},
            VenueScope(False, frozenset({"acme/widgets"})),
            id="allow-untrusted",
        ),
        pytest.param(
            {"build_repositories": ["acme/widgets", "acme/gears"]},
            VenueScope(True, frozenset({"acme/widgets", "acme/gears"})),
            id="wider-build-repositories",
        ),
        pytest.param({"build_repositories": ["*"]}, VenueScope(True, None), id="any"),
        pytest.param(
            {"build_repositories": [], "allow_untrusted": True},
            VenueScope(False, frozenset()),
            id="none",
        ),
    ],
)
def test_oidc_scopes_come_from_the_rule(values: dict[str, Any], expected: VenueScope) -> None:
    assert oidc_venue_scope(rule(**values)) == expected


def test_build_repositories_entries_must_not_be_empty() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        rule(build_repositories=[" "])


# ---- untrusted builds: own and shared steps ----------------------------------------------------
def test_a_live_trusted_step_is_shared_and_not_walked_below() -> None:
    # top -> mid -> lib; mid has a live trusted step: the untrusted build shares it, and lib
    # (needed only by mid) gets no untrusted step.
    deps = {"top": ["mid"], "mid": ["lib"], "lib": []}
    work = untrusted_work(deps, ["top"], live_trusted={"mid"})
    assert work.shared == {"mid"} and work.own == {"top"}


def test_without_live_trusted_steps_everything_is_own() -> None:
    deps = {"top": ["a", "b"], "a": ["lib"], "b": ["lib"], "lib": []}
    work = untrusted_work(deps, ["top"], live_trusted=set())
    assert work.shared == set() and work.own == set(deps)


def test_a_derivation_needed_beside_a_shared_one_stays_own() -> None:
    # lib is below the shared a, and also needed by the own b: it gets an untrusted step.
    deps = {"top": ["a", "b"], "a": ["lib"], "b": ["lib"], "lib": []}
    work = untrusted_work(deps, ["top"], live_trusted={"a"})
    assert work.shared == {"a"} and work.own == {"top", "b", "lib"}


def test_a_shared_root() -> None:
    work = untrusted_work({"top": ["lib"], "lib": []}, ["top"], live_trusted={"top", "lib"})
    assert work.shared == {"top"} and work.own == set()


@st.composite
def plans(draw: st.DrawFn) -> tuple[dict[str, list[str]], list[str], set[str]]:
    """A random DAG (edges only to earlier nodes), some roots, some live trusted nodes."""
    n = draw(st.integers(1, 12))
    names = [f"d{i}" for i in range(n)]
    deps = {
        name: sorted(draw(st.sets(st.sampled_from(names[:i]), max_size=3)) if i else [])
        for i, name in enumerate(names)
    }
    roots = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3))
    live = draw(st.sets(st.sampled_from(names)))
    return deps, roots, live


@given(plans())
def test_untrusted_work_properties(plan: tuple[dict[str, list[str]], list[str], set[str]]) -> None:
    deps, roots, live = plan
    work = untrusted_work(deps, roots, live)
    assert not work.shared & work.own
    assert work.shared <= live
    assert not work.own & live
    # Every root is built or shared; an own step's inputs are all built or shared (its
    # dependencies exist), and a shared one gets nothing walked below it that is not needed.
    assert set(roots) <= work.shared | work.own
    for drv in work.own:
        assert set(deps[drv]) <= work.shared | work.own
    needed = set(roots)
    for drv in work.own:
        needed.update(deps[drv])
    assert work.shared | work.own == needed
