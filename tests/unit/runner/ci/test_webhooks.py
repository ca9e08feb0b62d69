"""Webhook verification and payload parsing (pure)."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from bigtent.config.ci import ProjectSection
from bigtent.errors import AuthError, BadRequest
from bigtent.runner.ci.triggers import Decision, decide
from bigtent.runner.ci.webhooks import (
    HookForge,
    Ignored,
    Rerun,
    Trigger,
    TriggerKind,
    hook_headers,
    matching_secrets,
    parse_event,
    signature_matches,
)

SHA = "a" * 40
SECRET = b"s3cret"


def sign(body: bytes, secret: bytes = SECRET) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def test_github_signature_with_prefix_matches() -> None:
    body = b'{"x": 1}'
    assert signature_matches(SECRET, body, "sha256=" + sign(body))


def test_forgejo_bare_hex_signature_matches() -> None:
    body = b'{"x": 1}'
    assert signature_matches(SECRET, body, sign(body))


@pytest.mark.parametrize(
    "signature",
    ["", "sha256=", "sha256=" + "0" * 64, "sha1=abc", "not hex at all"],
)
def test_wrong_signatures_do_not_match(signature: str) -> None:
    assert not signature_matches(SECRET, b"{}", signature)


def test_a_body_changed_after_signing_does_not_match() -> None:
    signature = sign(b'{"after": "' + SHA.encode() + b'"}')
    assert not signature_matches(SECRET, b'{"after": "' + b"b" * 40 + b'"}', signature)


def test_another_secret_does_not_match() -> None:
    body = b"{}"
    assert not signature_matches(b"other", body, sign(body))


def test_matching_secrets_names_every_project_whose_secret_signs() -> None:
    body = b"{}"
    found = matching_secrets({"a": SECRET, "b": b"x", "c": SECRET}, body, sign(body))
    assert found == ["a", "c"]


def test_headers_need_a_signature() -> None:
    with pytest.raises(AuthError):
        hook_headers(HookForge.GITHUB, {"x-github-event": "push", "x-github-delivery": "d1"})


def test_headers_need_a_delivery_id() -> None:
    with pytest.raises(BadRequest):
        hook_headers(HookForge.GITHUB, {"x-github-event": "push", "x-hub-signature-256": "x"})


def test_forgejo_headers_are_read_under_either_name() -> None:
    hh = hook_headers(
        HookForge.FORGEJO,
        {"x-gitea-event": "push", "x-gitea-delivery": "d-1", "x-gitea-signature": "ab"},
    )
    assert (hh.event, hh.delivery, hh.signature) == ("push", "d-1", "ab")


def _push(**extra: object) -> dict[str, object]:
    return {
        "ref": "refs/heads/main",
        "after": SHA,
        "repository": {
            "full_name": "acme/widgets",
            "clone_url": "https://example.test/acme/widgets.git",
            "default_branch": "main",
        },
        **extra,
    }


def test_push_is_a_trigger_for_the_branch() -> None:
    event = parse_event("push", _push())
    assert isinstance(event, Trigger)
    assert event.kind is TriggerKind.PUSH
    assert (event.ref, event.commit_sha, event.branch) == ("refs/heads/main", SHA, "main")
    assert event.default_branch == "main"


def test_deleted_branch_and_tags_are_ignored() -> None:
    assert isinstance(parse_event("push", _push(deleted=True, after="0" * 40)), Ignored)
    assert isinstance(parse_event("push", _push(ref="refs/tags/v1")), Ignored)


def _pr(head_repo: str, association: str = "CONTRIBUTOR") -> dict[str, object]:
    return {
        "action": "synchronize",
        "number": 7,
        "pull_request": {
            "head": {"sha": SHA, "ref": "feature", "repo": {"full_name": head_repo}},
            "base": {"ref": "main", "repo": {"full_name": "acme/widgets"}},
            "author_association": association,
        },
        "repository": {"full_name": "acme/widgets", "default_branch": "main"},
    }


def test_pull_request_from_a_fork_uses_the_pull_ref_and_is_outside() -> None:
    event = parse_event("pull_request", _pr("mallory/widgets"))
    assert isinstance(event, Trigger)
    assert event.from_fork and event.outside
    assert event.ref == event.fetch_ref == "refs/pull/7/head"
    assert event.branch == "main"


def test_pull_request_from_the_repository_itself_is_under_its_pull_ref() -> None:
    event = parse_event("pull_request", _pr("acme/widgets", "MEMBER"))
    assert isinstance(event, Trigger)
    assert not event.from_fork and not event.outside
    assert event.ref == event.fetch_ref == "refs/pull/7/head"


def test_agit_pull_request_of_forgejo_is_not_a_branch_and_is_outside() -> None:
    """Forgejo/Gitea send head.ref = "refs/pull/N/head", and head.repo = base.repo for an
    AGit pull request, which anyone who can read the repository may open."""
    payload = _pr("acme/widgets")
    payload["pull_request"]["head"]["ref"] = "refs/pull/7/head"  # type: ignore[index]
    del payload["pull_request"]["author_association"]  # type: ignore[attr-defined]
    event = parse_event("pull_request", payload)
    assert isinstance(event, Trigger)
    assert event.from_fork and event.outside
    assert event.ref == event.fetch_ref == "refs/pull/7/head"
    approving = ProjectSection.model_validate(
        {"name": "w", "url": "https://example.test/acme/widgets.git"}
        | {"require_approval_for_outside": True}
    )
    assert decide(approving, event) == Decision(True, trusted=False, needs_approval=True)


def test_closed_pull_request_is_ignored() -> None:
    payload = _pr("acme/widgets")
    payload["action"] = "closed"
    assert isinstance(parse_event("pull_request", payload), Ignored)


@pytest.mark.parametrize(
    ("external_id", "expected"),
    [
        ("12", Rerun("acme/widgets", 12, None)),
        ("12/checks.x.y", Rerun("acme/widgets", 12, "checks.x.y")),
    ],
)
def test_check_run_rerequested_names_the_evaluation_and_job(
    external_id: str, expected: Rerun
) -> None:
    payload = {
        "action": "rerequested",
        "check_run": {"external_id": external_id},
        "repository": {"full_name": "acme/widgets"},
    }
    assert parse_event("check_run", payload) == expected


def test_check_run_of_someone_else_is_ignored() -> None:
    payload = {
        "action": "rerequested",
        "check_run": {"external_id": "ci-xyz"},
        "repository": {"full_name": "acme/widgets"},
    }
    assert isinstance(parse_event("check_run", payload), Ignored)


def test_unknown_event_is_ignored() -> None:
    assert isinstance(
        parse_event("star", json.loads('{"repository": {"full_name": "a/b"}}')), Ignored
    )
