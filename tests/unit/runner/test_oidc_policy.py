"""policy.check: tables of claims against issuer rules (pure, no keys, no network)."""

from __future__ import annotations

from typing import Any

import pytest

from bigtent.config import OidcIssuerSection
from bigtent.errors import AuthError
from bigtent.runner.auth.policy import AgentIdentity, PolicyDenied, check

GITHUB = "https://token.actions.githubusercontent.com"
GITLAB = "https://gitlab.example.org"

CLAIMS: dict[str, Any] = {
    "iss": GITHUB,
    "aud": "bigtent",
    "sub": "repo:acme/widgets:ref:refs/heads/main",
    "repository": "acme/widgets",
    "repository_owner": "acme",
    "ref": "refs/heads/main",
    "workflow_ref": "acme/widgets/.github/workflows/ci.yml@refs/heads/main",
    "job_workflow_ref": "acme/widgets/.github/workflows/ci.yml@refs/heads/main",
}
REUSABLE = "acme/agents/.github/workflows/agent.yml@refs/heads/main"

GITLAB_CLAIMS: dict[str, Any] = {
    "iss": GITLAB,
    "aud": "bigtent",
    "sub": "project_path:acme/widgets:ref_type:branch:ref:main",
    "project_path": "acme/widgets",
    "ref": "main",
    "ref_type": "branch",
    "ref_path": "refs/heads/main",
    "ci_config_ref_uri": "gitlab.example.org/acme/widgets//.gitlab-ci.yml@refs/heads/main",
}


def rule(**kw: Any) -> OidcIssuerSection:
    base: dict[str, Any] = {"issuer": GITHUB, "audiences": ["bigtent"]}
    return OidcIssuerSection.model_validate(base | kw)


def test_admitted_claims_become_an_identity() -> None:
    identity = check(CLAIMS, rule(repositories=["acme/widgets"]))
    assert identity == AgentIdentity(
        issuer=GITHUB,
        repository="acme/widgets",
        subject="repo:acme/widgets:ref:refs/heads/main",
        workflow_ref="acme/widgets/.github/workflows/ci.yml@refs/heads/main",
        ref="refs/heads/main",
    )


ADMITTED: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("repository listed", {}, {"repositories": ["other/x", "acme/widgets"]}),
    (
        "exact subject",
        {},
        {"repositories": ["acme/widgets"], "subjects": ["repo:acme/widgets:ref:refs/heads/main"]},
    ),
    (
        "subject prefix",
        {},
        {"repositories": ["acme/widgets"], "subject_prefixes": ["repo:acme/widgets:ref:"]},
    ),
    (
        "subject matches a prefix though not the exact list",
        {},
        {
            "repositories": ["acme/widgets"],
            "subjects": ["repo:acme/widgets:environment:prod"],
            "subject_prefixes": ["repo:acme/widgets:ref:refs/heads/"],
        },
    ),
    (
        "workflow listed",
        {},
        {"repositories": ["acme/widgets"], "workflow_refs": [CLAIMS["job_workflow_ref"]]},
    ),
    (
        "reusable workflow: job_workflow_ref is what counts",
        {"job_workflow_ref": REUSABLE},
        {"repositories": ["acme/widgets"], "workflow_refs": [REUSABLE]},
    ),
    (
        "workflow_ref alone (no job_workflow_ref claim)",
        {"job_workflow_ref": None},
        {"repositories": ["acme/widgets"], "workflow_refs": [CLAIMS["workflow_ref"]]},
    ),
    ("ref listed", {}, {"repositories": ["acme/widgets"], "refs": ["refs/heads/main"]}),
    (
        "empty optional lists are off",
        {"ref": None, "job_workflow_ref": None},
        {"repositories": ["acme/widgets"]},
    ),
]


@pytest.mark.parametrize(("why", "change", "kw"), ADMITTED, ids=[a[0] for a in ADMITTED])
def test_admitted(why: str, change: dict[str, Any], kw: dict[str, Any]) -> None:
    claims = {k: v for k, v in (CLAIMS | change).items() if v is not None}
    identity = check(claims, rule(**kw))
    assert identity.repository == "acme/widgets"


DENIED: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("empty repository list admits nobody", {}, {}, "no repository is allowed"),
    ("repository not listed", {}, {"repositories": ["acme/other"]}, "repository not allowed"),
    (
        "repository match is case-sensitive",
        {},
        {"repositories": ["Acme/Widgets"]},
        "repository not allowed",
    ),
    (
        "no repository claim",
        {"repository": None},
        {"repositories": ["acme/widgets"]},
        "no repository",
    ),
    (
        "repository claim not a string",
        {"repository": ["acme/widgets"]},
        {"repositories": ["acme/widgets"]},
        "malformed",
    ),
    ("no sub", {"sub": None}, {"repositories": ["acme/widgets"]}, "no sub"),
    (
        "subject not in exact list",
        {},
        {"repositories": ["acme/widgets"], "subjects": ["repo:acme/widgets:ref:refs/heads/dev"]},
        "subject not allowed",
    ),
    (
        "subject outside every prefix",
        {"sub": "repo:acme/widgets:pull_request"},
        {"repositories": ["acme/widgets"], "subject_prefixes": ["repo:acme/widgets:ref:"]},
        "subject not allowed",
    ),
    (
        "workflow not listed",
        {},
        {"repositories": ["acme/widgets"], "workflow_refs": [REUSABLE]},
        "workflow not allowed",
    ),
    (
        "caller workflow listed but the job runs another (reusable) workflow",
        {"job_workflow_ref": REUSABLE},
        {"repositories": ["acme/widgets"], "workflow_refs": [CLAIMS["workflow_ref"]]},
        "workflow not allowed",
    ),
    (
        "workflow required but absent",
        {"job_workflow_ref": None, "workflow_ref": None},
        {"repositories": ["acme/widgets"], "workflow_refs": [CLAIMS["workflow_ref"]]},
        "workflow not allowed",
    ),
    (
        "ref not listed",
        {"ref": "refs/heads/feature"},
        {"repositories": ["acme/widgets"], "refs": ["refs/heads/main"]},
        "ref not allowed",
    ),
    (
        "ref required but absent",
        {"ref": None},
        {"repositories": ["acme/widgets"], "refs": ["refs/heads/main"]},
        "ref not allowed",
    ),
    (
        "ref claim not a string",
        {"ref": 7},
        {"repositories": ["acme/widgets"], "refs": ["refs/heads/main"]},
        "malformed",
    ),
]


@pytest.mark.parametrize(("why", "change", "kw", "reason"), DENIED, ids=[d[0] for d in DENIED])
def test_denied(why: str, change: dict[str, Any], kw: dict[str, Any], reason: str) -> None:
    claims = {k: v for k, v in (CLAIMS | change).items() if v is not None}
    with pytest.raises(PolicyDenied, match=reason) as info:
        check(claims, rule(**kw))
    assert isinstance(info.value, AuthError)
    assert info.value.http_status == 403


def test_gitlab_claim_names() -> None:
    gl = rule(
        issuer=GITLAB,
        claims="gitlab",
        repositories=["acme/widgets"],
        subject_prefixes=["project_path:acme/widgets:ref_type:branch:ref:"],
        refs=["refs/heads/main"],
        workflow_refs=[GITLAB_CLAIMS["ci_config_ref_uri"]],
    )
    identity = check(GITLAB_CLAIMS, gl)
    assert identity == AgentIdentity(
        issuer=GITLAB,
        repository="acme/widgets",
        subject="project_path:acme/widgets:ref_type:branch:ref:main",
        workflow_ref=GITLAB_CLAIMS["ci_config_ref_uri"],
        ref="refs/heads/main",
    )
    # GitHub claim names mean nothing under the gitlab claim set, and vice versa.
    with pytest.raises(PolicyDenied, match="no project_path"):
        check(CLAIMS, gl)
    with pytest.raises(PolicyDenied, match="no repository"):
        check(GITLAB_CLAIMS, rule(repositories=["acme/widgets"]))
    with pytest.raises(PolicyDenied, match="ref not allowed"):
        check(GITLAB_CLAIMS | {"ref_path": "refs/heads/dev"}, gl)
