"""Who sees Nix's message of an evaluation (pure): an untrusted one's only admins."""

from __future__ import annotations

from bigtent.runner.ci.disclosure import (
    UNTRUSTED_EVAL_ERROR,
    UNTRUSTED_JOB_ERROR,
    shown_eval_error,
    shown_job_error,
)

LEAK = (
    "error: NAR hash mismatch in input 'path:/var/lib/bigtent/cache.sk', expected "
    "'sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=', got "
    "'sha256-vMQUzjijdN4mCdeUXTh519jkctNNXAno+mZcsoAfYZ0='"
)
URL = "https://ci.example/ci/evaluations/7"


def test_untrusted_errors_are_a_fixed_message_for_non_admins() -> None:
    shown = shown_eval_error(LEAK, trusted=False, admin=False, url=URL)
    assert shown == f"{UNTRUSTED_EVAL_ERROR}: {URL}"
    job = shown_job_error(LEAK, trusted=False, admin=False)
    assert job == UNTRUSTED_JOB_ERROR
    for text in (shown, job):
        assert "vMQUzj" not in text and "cache.sk" not in text and "sha256" not in text


def test_admins_and_trusted_evaluations_see_nix_s_message() -> None:
    assert shown_eval_error(LEAK, trusted=False, admin=True) == LEAK
    assert shown_eval_error(LEAK, trusted=True, admin=False) == LEAK
    assert shown_job_error(LEAK, trusted=True, admin=False) == LEAK
    assert shown_job_error(LEAK, trusted=False, admin=True) == LEAK


def test_no_error_stays_none() -> None:
    assert shown_eval_error(None, trusted=False, admin=False) is None
    assert shown_job_error("", trusted=False, admin=False) == ""
