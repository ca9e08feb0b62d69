"""Webhooks from GitHub and Forgejo/Gitea: signature, delivery id and payload (pure).

The route (``routes.py``) bounds the body before reading it, then: the signature must be an
HMAC-SHA256 of the raw body under some project's secret (``hmac.compare_digest``, every
candidate compared), the payload must name a configured repository, and the delivery id must
be new (the replay table). Only then is anything stored. Parsing happens after the signature
matched, so an unsigned body is never parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bigtent.errors import AuthError, BadRequest


class HookForge(StrEnum):
    GITHUB = "github"
    FORGEJO = "forgejo"  # also Gitea: the same payloads under X-Gitea-* headers


class TriggerKind(StrEnum):
    PUSH = "push"
    PULL_REQUEST = "pull_request"
    POLL = "poll"
    MANUAL = "manual"


@dataclass(frozen=True, slots=True)
class HookHeaders:
    """What the route reads from a delivery's headers."""

    event: str
    delivery: str
    signature: str


SIGNATURE_HEADERS = {
    HookForge.GITHUB: ("x-hub-signature-256",),
    HookForge.FORGEJO: ("x-forgejo-signature", "x-gitea-signature", "x-hub-signature-256"),
}
EVENT_HEADERS = {
    HookForge.GITHUB: ("x-github-event",),
    HookForge.FORGEJO: ("x-forgejo-event", "x-gitea-event", "x-github-event"),
}
DELIVERY_HEADERS = {
    HookForge.GITHUB: ("x-github-delivery",),
    HookForge.FORGEJO: ("x-forgejo-delivery", "x-gitea-delivery", "x-github-delivery"),
}
MAX_REF_CHARS = 255
_DELIVERY = re.compile(r"[A-Za-z0-9._-]{1,100}")
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def hook_headers(forge: HookForge, headers: dict[str, str]) -> HookHeaders:
    """The event, delivery id and signature of a delivery (AuthError without a signature,
    BadRequest without an event or a delivery id). ``headers`` keys are lower case."""

    def first(names: tuple[str, ...]) -> str:
        return next((headers[n] for n in names if headers.get(n)), "")

    signature = first(SIGNATURE_HEADERS[forge])
    if not signature:
        raise AuthError("webhook without a signature (configure the webhook's secret)")
    event = first(EVENT_HEADERS[forge])
    delivery = first(DELIVERY_HEADERS[forge])
    if not event:
        raise BadRequest("webhook without an event header")
    if not _DELIVERY.fullmatch(delivery):
        raise BadRequest("webhook without a valid delivery id")
    return HookHeaders(event=event, delivery=delivery, signature=signature)


def signature_matches(secret: bytes, body: bytes, signature: str) -> bool:
    """Whether ``signature`` (``sha256=<hex>`` as GitHub sends it, or the bare hex Forgejo
    and Gitea send) is the HMAC-SHA256 of ``body`` under ``secret``; constant-time."""
    given = signature.strip()
    if given.startswith("sha256="):
        given = given[len("sha256=") :]
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), given.lower().encode())


def matching_secrets(secrets: dict[str, bytes], body: bytes, signature: str) -> list[str]:
    """The names whose secret signs ``body`` as ``signature`` (each compared, no early exit)."""
    return [name for name, s in secrets.items() if signature_matches(s, body, signature)]


# ---- payloads -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Trigger:
    """A push or a pull request's new head, as a forge reported it."""

    kind: TriggerKind
    repository: str
    """``owner/name`` of the repository the hook is for."""
    clone_urls: tuple[str, ...]
    ref: str
    """What the evaluation is for: ``refs/heads/B`` for a push, ``refs/pull/N/head`` for a
    pull request (from a fork or not: a pull request is never built trusted, a branch of the
    repository is, by its push events)."""
    fetch_ref: str
    """What to fetch from the project's URL to get the commit."""
    commit_sha: str
    branch: str
    """The pushed branch, or the pull request's base branch."""
    default_branch: str = ""
    pull_request: int | None = None
    from_fork: bool = False
    """The head is not a branch of the repository itself: a fork, or an AGit pull request
    (Gitea/Forgejo), whose head.ref is a ``refs/…`` ref."""
    outside: bool = False
    """The author is not known as an owner, member or collaborator of the repository (Gitea
    and Forgejo do not say: every author of theirs is outside)."""


@dataclass(frozen=True, slots=True)
class Rerun:
    """GitHub's "Re-run" of a check run: ``external_id`` names what to restart."""

    repository: str
    evaluation_id: int
    attr: str | None
    """None: the summary run (restart every failed job)."""


@dataclass(frozen=True, slots=True)
class Ignored:
    reason: str


Event = Trigger | Rerun | Ignored

_INSIDERS = frozenset({"OWNER", "MEMBER", "COLLABORATOR"})
_PR_ACTIONS = frozenset({"opened", "synchronize", "synchronized", "reopened", "edited"})


def parse_payload(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("webhook body is not JSON") from exc
    if not isinstance(data, dict):
        raise BadRequest("webhook body is not a JSON object")
    return data


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _str(d: Any, *keys: str) -> str:
    v = _get(d, *keys)
    return v if isinstance(v, str) else ""


def _repo(payload: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    repo = payload.get("repository")
    name = _str(repo, "full_name")
    urls = tuple(
        u for u in (_str(repo, k) for k in ("clone_url", "ssh_url", "git_url", "html_url")) if u
    )
    return name, urls


def parse_event(event: str, payload: dict[str, Any]) -> Event:
    """What a delivery asks for (pure). Unknown events and actions are ``Ignored``."""
    repository, urls = _repo(payload)
    if not repository:
        return Ignored("no repository in the payload")
    default_branch = _str(payload, "repository", "default_branch")
    if event == "push":
        ref = _str(payload, "ref")
        sha = _str(payload, "after")
        if payload.get("deleted") or not _SHA.fullmatch(sha) or set(sha) == {"0"}:
            return Ignored("a deleted ref")
        if not ref.startswith("refs/heads/"):
            return Ignored(f"not a branch: {ref[:100]}")
        if len(ref) > MAX_REF_CHARS:
            raise BadRequest(f"ref longer than {MAX_REF_CHARS} characters")
        return Trigger(
            kind=TriggerKind.PUSH,
            repository=repository,
            clone_urls=urls,
            ref=ref,
            fetch_ref=ref,
            commit_sha=sha,
            branch=ref.removeprefix("refs/heads/"),
            default_branch=default_branch,
        )
    if event == "pull_request":
        action = _str(payload, "action")
        if action not in _PR_ACTIONS:
            return Ignored(f"pull request {action or 'event'}")
        pr = payload.get("pull_request")
        number = payload.get("number", _get(pr, "number"))
        sha = _str(pr, "head", "sha")
        if not isinstance(number, int) or number <= 0 or not _SHA.fullmatch(sha):
            raise BadRequest("pull request payload without a number or head commit")
        head_repo = _str(pr, "head", "repo", "full_name")
        base_repo = _str(pr, "base", "repo", "full_name") or repository
        # Gitea and Forgejo send head.ref = "refs/pull/N/head", and for an AGit pull request
        # (``git push origin HEAD:refs/for/main``, open to anyone who can read the repository)
        # head.repo = base.repo: a head.ref under refs/ is no branch of the repository.
        head_ref = _str(pr, "head", "ref")
        from_fork = head_repo != base_repo or not head_ref or head_ref.startswith("refs/")
        association = _str(pr, "author_association") or _str(payload, "author_association")
        pull_ref = f"refs/pull/{number}/head"
        return Trigger(
            kind=TriggerKind.PULL_REQUEST,
            repository=repository,
            clone_urls=urls,
            ref=pull_ref,
            fetch_ref=pull_ref,
            commit_sha=sha,
            branch=_str(pr, "base", "ref"),
            default_branch=default_branch,
            pull_request=number,
            from_fork=from_fork,
            outside=association not in _INSIDERS,
        )
    if event == "check_run":
        if _str(payload, "action") != "rerequested":
            return Ignored("check run event other than rerequested")
        external = _str(payload, "check_run", "external_id")
        head, _, attr = external.partition("/")
        if not head.isdigit() or not 0 < int(head) < 2**63:
            return Ignored("check run without a bigtent external id")
        return Rerun(repository, int(head), attr or None)
    return Ignored(f"event {event!r}")
