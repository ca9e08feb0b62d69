"""reporting.py: an evaluation's report → the checks a forge should show (names, states,
summary, failed-job output, the cap) and what changed since the forge was last told."""

from __future__ import annotations

import dataclasses

import pytest

from bigtent.config.forge import ForgeKind, ForgeTarget
from bigtent.runner.forge.model import EvalReport, EvalState, JobReport, JobState
from bigtent.runner.forge.reporting import (
    MAX_OUTPUT_CHARS,
    Check,
    CheckStatus,
    Conclusion,
    Sent,
    StatusState,
    changed,
    commit_status,
    fenced,
    fingerprint,
    needs_new_run,
    plan_round,
    sent_as,
    wanted_checks,
)

TARGET = ForgeTarget(ForgeKind.GITHUB, "https://api.github.com", "acme/widgets", app_id=7)
PREFIX = "checks.x86_64-linux"


def job(name: str, state: JobState, **kw: str) -> JobReport:
    return JobReport(attr=f"{PREFIX}.{name}", state=state, **kw)


def report(state: EvalState, *jobs: JobReport, evaluation_id: int = 41, **kw: str) -> EvalReport:
    return EvalReport(
        project="widgets",
        target=TARGET,
        commit_sha="a" * 40,
        evaluation_id=evaluation_id,
        state=state,
        url="https://ci.example/evals/41",
        jobs=jobs,
        **kw,
    )


@pytest.mark.parametrize(
    ("state", "status", "conclusion", "title"),
    [
        (EvalState.QUEUED, CheckStatus.QUEUED, None, "queued"),
        (EvalState.EVALUATING, CheckStatus.IN_PROGRESS, None, "evaluating"),
        (EvalState.BUILDING, CheckStatus.IN_PROGRESS, None, "building: 1 of 2 jobs done"),
        (EvalState.SUCCEEDED, CheckStatus.COMPLETED, Conclusion.SUCCESS, "2 jobs succeeded"),
        (EvalState.FAILED, CheckStatus.COMPLETED, Conclusion.FAILURE, "0 of 2 jobs failed"),
        (EvalState.EVAL_ERROR, CheckStatus.COMPLETED, Conclusion.FAILURE, "evaluation failed"),
        (EvalState.CANCELLED, CheckStatus.COMPLETED, Conclusion.CANCELLED, "cancelled"),
    ],
)
def test_the_summary_check_follows_the_evaluation_state(
    state: EvalState, status: CheckStatus, conclusion: Conclusion | None, title: str
) -> None:
    jobs = (job("a", JobState.SUCCEEDED), job("b", JobState.RUNNING))
    summary = wanted_checks(report(state, *jobs))[0]
    assert summary.name == "bigtent/widgets/eval"
    assert summary.external_id == "41"
    assert (summary.status, summary.conclusion, summary.title) == (status, conclusion, title)
    assert summary.details_url == "https://ci.example/evals/41"


@pytest.mark.parametrize(
    ("state", "status", "conclusion", "forgejo"),
    [
        (JobState.QUEUED, CheckStatus.QUEUED, None, StatusState.PENDING),
        (JobState.RUNNING, CheckStatus.IN_PROGRESS, None, StatusState.PENDING),
        (JobState.SUCCEEDED, CheckStatus.COMPLETED, Conclusion.SUCCESS, StatusState.SUCCESS),
        (JobState.FAILED, CheckStatus.COMPLETED, Conclusion.FAILURE, StatusState.FAILURE),
        (JobState.CANCELLED, CheckStatus.COMPLETED, Conclusion.CANCELLED, StatusState.ERROR),
    ],
)
def test_a_job_check_follows_the_job_state_on_both_forges(
    state: JobState, status: CheckStatus, conclusion: Conclusion | None, forgejo: StatusState
) -> None:
    name = "bigtent/widgets/checks.x86_64-linux.fmt"
    # the job has a check already (it failed before), so it keeps one whatever its state
    checks = wanted_checks(report(EvalState.BUILDING, job("fmt", state)), existing={name})
    assert [c.name for c in checks] == ["bigtent/widgets/eval", name]
    check = checks[1]
    assert check.external_id == "41/checks.x86_64-linux.fmt"
    assert (check.status, check.conclusion) == (status, conclusion)
    assert commit_status(check).state is forgejo
    assert commit_status(check).context == name


def test_only_failed_jobs_get_a_check_and_names_carry_no_ids() -> None:
    jobs = (
        job("ok", JobState.SUCCEEDED),
        job("broken", JobState.FAILED, summary="builder exited 1", log_tail="error: boom\n"),
        job("slow", JobState.RUNNING),
    )
    first = wanted_checks(report(EvalState.BUILDING, *jobs, evaluation_id=41))
    second = wanted_checks(report(EvalState.BUILDING, *jobs, evaluation_id=97))
    assert [c.name for c in first] == [
        "bigtent/widgets/eval",
        "bigtent/widgets/checks.x86_64-linux.broken",
    ]
    # another evaluation (another commit, another build): the same names, other external ids
    assert [c.name for c in second] == [c.name for c in first]
    assert [c.external_id for c in second] == ["97", "97/checks.x86_64-linux.broken"]
    broken = first[1]
    assert broken.title == "failed: builder exited 1"
    assert "error: boom" in broken.text and broken.text.rstrip().endswith("```")


def test_the_cap_keeps_existing_checks_and_the_summary_counts_the_rest() -> None:
    failed = [job(f"f{i:03}", JobState.FAILED) for i in range(60)]
    checks = wanted_checks(report(EvalState.FAILED, *failed), max_job_checks=47)
    assert len(checks) == 48
    assert [c.name for c in checks[1:]] == [f"bigtent/widgets/{PREFIX}.f{i:03}" for i in range(47)]
    summary = checks[0]
    assert summary.title == "60 of 60 jobs failed"
    assert "13 failed jobs have no check run of their own (at most 47" in summary.summary
    # A job with a check keeps it, even past the cap: a re-run may turn it green.
    existing = {f"bigtent/widgets/{PREFIX}.f059"}
    again = wanted_checks(report(EvalState.FAILED, *failed), existing, max_job_checks=47)
    names = [c.name for c in again[1:]]
    assert len(names) == 47 and names[-1] == f"bigtent/widgets/{PREFIX}.f059"
    assert f"bigtent/widgets/{PREFIX}.f046" not in names


def test_an_evaluation_error_carries_nix_s_message_and_output_stays_within_github_limits() -> None:
    error = "error: attribute 'nope' missing\n" + "at /nix/store/x/flake.nix:3:5\n" * 10_000
    summary = wanted_checks(report(EvalState.EVAL_ERROR, error=error))[0]
    assert summary.conclusion is Conclusion.FAILURE
    assert len(summary.text) <= MAX_OUTPUT_CHARS
    assert summary.text.rstrip("`\n").endswith("flake.nix:3:5")
    assert "characters before this" in summary.text
    huge_log = "\x1b[31mred\x1b[0m line\n" * 100_000
    failed = job("x", JobState.FAILED, log_tail=huge_log)
    check = wanted_checks(report(EvalState.FAILED, failed), log_tail_chars=1000)[1]
    assert len(check.text) < 1100
    assert "\x1b" not in check.text and "red line" in check.text


def test_a_log_holding_a_fence_gets_a_longer_fence() -> None:
    text = fenced("before\n```\ninside\n```\nafter", 1000)
    assert text.startswith("````\n") and text.endswith("\n````")


def test_changes_compare_what_the_forge_shows() -> None:
    jobs = (job("a", JobState.FAILED),)
    wanted = wanted_checks(report(EvalState.BUILDING, *jobs))
    sent = {c.name: Sent(fingerprint(ForgeKind.GITHUB, c), c.status, 5) for c in wanted}
    assert changed(ForgeKind.GITHUB, wanted, sent) == []
    later = wanted_checks(report(EvalState.FAILED, *jobs))
    assert [c.name for c in changed(ForgeKind.GITHUB, later, sent)] == ["bigtent/widgets/eval"]
    assert [c.name for c in changed(ForgeKind.GITHUB, later, {})] == [c.name for c in later]


def test_a_forgejo_status_changes_only_when_its_fields_do() -> None:
    check = Check("n", "1", CheckStatus.COMPLETED, Conclusion.FAILURE, "t", "long summary")
    other_text = dataclasses.replace(check, summary="another summary", text="log")
    assert fingerprint(ForgeKind.FORGEJO, check) == fingerprint(ForgeKind.FORGEJO, other_text)
    assert fingerprint(ForgeKind.GITHUB, check) != fingerprint(ForgeKind.GITHUB, other_text)
    status = commit_status(dataclasses.replace(check, title="x" * 500))
    assert len(status.description) == 140


def test_status_changes_go_at_once_and_counter_changes_wait_for_the_interval() -> None:
    running = Check("e", "1", CheckStatus.IN_PROGRESS, None, "building: 1 of 9 jobs done", "")
    sent = {"e": sent_as(ForgeKind.GITHUB, running, 3)}
    counter = dataclasses.replace(running, title="building: 2 of 9 jobs done")
    # a change of text alone waits for the interval after the last full round ...
    assert plan_round([counter], sent, 100.0, 10.0, 105.0) == ([], 110.0)
    assert plan_round([counter], sent, 100.0, 10.0, 110.0) == ([counter], None)
    assert plan_round([counter], sent, None, 10.0, 105.0) == ([counter], None)
    # ... while a new check (a job that failed) goes at once, without it
    new = Check("j", "1/j", CheckStatus.COMPLETED, Conclusion.FAILURE, "failed", "")
    assert plan_round([counter, new], sent, 100.0, 10.0, 105.0) == ([new], 110.0)
    # a change of status (here the final one) takes everything with it
    done = dataclasses.replace(running, status=CheckStatus.COMPLETED, conclusion=Conclusion.SUCCESS)
    assert plan_round([done, new], sent, 100.0, 10.0, 105.0) == ([done, new], None)


def test_check_and_sent_round_trip_through_json() -> None:
    check = wanted_checks(report(EvalState.FAILED, job("a", JobState.FAILED, url="https://x/1")))
    assert [Check.from_json(c.to_json()) for c in check] == list(check)
    sent = Sent("ab", CheckStatus.COMPLETED, 12)
    assert Sent.from_json(sent.to_json()) == sent


def test_a_completed_run_is_never_reopened_but_its_text_may_change() -> None:
    failed = Check("j", "1/j", CheckStatus.COMPLETED, Conclusion.FAILURE, "failed", "s")
    sent = sent_as(ForgeKind.GITHUB, failed, run_id=9)
    assert needs_new_run(failed, None)
    assert needs_new_run(failed, sent_as(ForgeKind.GITHUB, failed))  # no id: never created
    assert not needs_new_run(dataclasses.replace(failed, summary="more text"), sent)
    rerun = dataclasses.replace(failed, status=CheckStatus.IN_PROGRESS, conclusion=None)
    assert needs_new_run(rerun, sent)
    assert needs_new_run(dataclasses.replace(failed, conclusion=Conclusion.SUCCESS), sent)
    running = sent_as(ForgeKind.GITHUB, rerun, run_id=10)
    assert not needs_new_run(dataclasses.replace(failed, conclusion=Conclusion.SUCCESS), running)
