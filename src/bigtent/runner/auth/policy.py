"""Claim policy for OIDC agents: which verified ID tokens may become an agent (pure).

``check(claims, rule)`` runs after ``oidc.py`` has checked the signature and the time,
issuer and audience claims. It reads the repository, subject, workflow and ref claims under
the names of the rule's claim set and applies the rule's allow-lists (architecture §6,
docs/oidc.md):

- ``repositories``: the repository must be listed; an empty list admits nobody.
- ``subjects`` / ``subject_prefixes``: together one check, on when either is non-empty; the
  ``sub`` must equal a subject or start with a prefix.
- ``workflow_refs``, ``refs``: on when non-empty; the claim must be present and listed.

Every comparison is exact (case-sensitive). Claim names per claim set (``rule.claims``):

- ``github``: ``repository``; workflow ``job_workflow_ref``, else ``workflow_ref``; ``ref``.
- ``gitlab``: ``project_path``; workflow ``ci_config_ref_uri``; ref ``ref_path``.

``github`` also fits Forgejo (and Gitea) Actions, whose tokens copy GitHub's claim names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bigtent.config import OidcIssuerSection
from bigtent.errors import Forbidden


class PolicyDenied(Forbidden):
    """A valid ID token whose claims the issuer's rule does not admit (HTTP 403)."""


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """Who an OIDC agent is: the CI job that minted its token."""

    issuer: str
    repository: str
    subject: str
    workflow_ref: str | None
    """The workflow whose code runs the job (GitHub: ``job_workflow_ref``, which differs from
    ``workflow_ref`` when a reusable workflow is called)."""
    ref: str | None
    """The git ref the job runs for, e.g. ``refs/heads/main``."""


@dataclass(frozen=True, slots=True)
class _ClaimNames:
    repository: str
    workflow: tuple[str, ...]
    """Tried in order; the first present wins."""
    ref: str


CLAIM_NAMES: Mapping[str, _ClaimNames] = {
    "github": _ClaimNames("repository", ("job_workflow_ref", "workflow_ref"), "ref"),
    "gitlab": _ClaimNames("project_path", ("ci_config_ref_uri",), "ref_path"),
}


def _optional_str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise PolicyDenied(f"claim {name} is malformed")
    return value


def check(claims: Mapping[str, Any], rule: OidcIssuerSection) -> AgentIdentity:
    """The identity these verified claims stand for, or raise PolicyDenied with a short reason."""
    names = CLAIM_NAMES[rule.claims]

    repository = _optional_str(claims, names.repository)
    if repository is None:
        raise PolicyDenied(f"token has no {names.repository} claim")
    subject = _optional_str(claims, "sub")
    if subject is None:
        raise PolicyDenied("token has no sub claim")
    workflow_ref = None
    for name in names.workflow:
        workflow_ref = _optional_str(claims, name)
        if workflow_ref is not None:
            break
    ref = _optional_str(claims, names.ref)

    if not rule.repositories:
        raise PolicyDenied("no repository is allowed for this issuer")
    if repository not in rule.repositories:
        raise PolicyDenied("repository not allowed")
    if (rule.subjects or rule.subject_prefixes) and not (
        subject in rule.subjects or any(subject.startswith(p) for p in rule.subject_prefixes)
    ):
        raise PolicyDenied("subject not allowed")
    if rule.workflow_refs and workflow_ref not in rule.workflow_refs:
        raise PolicyDenied("workflow not allowed")
    if rule.refs and ref not in rule.refs:
        raise PolicyDenied("ref not allowed")

    return AgentIdentity(
        issuer=rule.issuer,
        repository=repository,
        subject=subject,
        workflow_ref=workflow_ref,
        ref=ref,
    )
