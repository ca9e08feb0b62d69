"""The evaluator's pure parts: the expression, the jobs Nix printed, how a run ended."""

from __future__ import annotations

import json

import pytest

from bigtent.config.ci import EvaluationSection
from bigtent.nix.store import BoundedRun
from bigtent.runner.ci.evaluator import (
    EvalFailure,
    attr_path,
    judge_run,
    nix_string_body,
    parse_jobs,
)

LIMITS = EvaluationSection(max_memory_mib=256, timeout_secs=10, max_jobs=3)


def test_nix_string_body_cannot_interpolate_or_end_the_string() -> None:
    body = nix_string_body('a"b${c}\\d\n')
    assert "${" not in body.replace("\\$", "")
    assert body == 'a\\"b\\${c}\\\\d\\n'


def test_attr_paths_quote_odd_names() -> None:
    assert attr_path(["checks", "x86_64-linux", "fmt"]) == "checks.x86_64-linux.fmt"
    assert attr_path(["hydraJobs", "a.b"]) == 'hydraJobs."a.b"'


def test_parse_jobs_sorts_and_keeps_errors() -> None:
    out = json.dumps(
        [
            {"attr": ["checks", "s", "b"], "drvPath": "/nix/store/" + "b" * 32 + "-b.drv"},
            {"attr": ["checks", "s", "a"], "error": "evaluation failed"},
        ]
    ).encode()
    jobs = parse_jobs(out, 10)
    assert [j.attr for j in jobs] == ["checks.s.a", "checks.s.b"]
    assert jobs[0].error == "evaluation failed" and jobs[0].drv_path is None
    assert jobs[1].drv_path is not None


def test_parse_jobs_refuses_too_many() -> None:
    out = json.dumps([{"attr": [str(i)], "error": "x"} for i in range(4)]).encode()
    with pytest.raises(EvalFailure) as info:
        parse_jobs(out, 3)
    assert info.value.kind == "too_many"


def test_parse_jobs_refuses_a_non_store_path_as_a_derivation() -> None:
    out = json.dumps([{"attr": ["x"], "drvPath": "/etc/passwd"}]).encode()
    (job,) = parse_jobs(out, 3)
    assert job.drv_path is None and job.error


@pytest.mark.parametrize(
    ("run", "kind"),
    [
        (BoundedRun(1, b"", "error: out of memory", out_of_memory=True), "memory"),
        (BoundedRun(None, b"", "", timed_out=True), "timeout"),
        (BoundedRun(None, b"", "", aborted=True), "aborted"),
        (BoundedRun(1, b"", "error: undefined variable 'x'"), "error"),
    ],
)
def test_judge_run_names_what_ended_it(run: BoundedRun, kind: str) -> None:
    with pytest.raises(EvalFailure) as info:
        judge_run(run, LIMITS)
    assert info.value.kind == kind


def test_an_eval_error_keeps_nix_full_message() -> None:
    text = "error: undefined variable 'x'\n\n       at /nix/store/…/flake.nix:3:5:\n"
    with pytest.raises(EvalFailure) as info:
        judge_run(BoundedRun(1, b"", text), LIMITS)
    assert "at /nix/store/…/flake.nix:3:5" in info.value.message
