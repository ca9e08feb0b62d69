"""``bigtent build`` with the flow answered at once: ``--json``, the failure report with its
log tail, usage errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bigtent.apimodels import Build
from bigtent.cli.buildview import report_failure, report_result
from bigtent.client.build import BuildResult
from bigtent.client.outputs import ResultLink
from tests.unit.cli.helpers import run_cli
from tests.unit.cli.samples import BUILD

run = run_cli


def test_build_usage_errors() -> None:
    result = run(["build", "--drv", "/nix/store/abc-hello"])
    assert result.exit_code == 2 and "--drv needs a store derivation" in result.stderr
    result = run(["build", "x.nix", "--drv", "/nix/store/abc-x.drv"])
    assert result.exit_code == 2 and "one kind of target" in result.stderr


def _fake_build_flow(monkeypatch: pytest.MonkeyPatch, final: dict[str, Any]) -> None:
    import bigtent.client.build as build_module
    from bigtent.apimodels import Build
    from bigtent.client.build import BuildResult

    async def fake_run_build(
        client: Any, store: Any, drvs: Any, options: Any, observer: Any, tracker: Any = None
    ) -> BuildResult:
        assert drvs == ["/nix/store/aaaa-hello.drv"] and options.download is False
        observer.on_phase("uploading")
        return BuildResult(Build.model_validate(final))

    monkeypatch.setattr(build_module, "run_build", fake_run_build)


def test_build_json_success(monkeypatch: pytest.MonkeyPatch) -> None:
    final = {**BUILD, "state": "succeeded", "roots": [{**BUILD["roots"][0], "state": "succeeded"}]}
    _fake_build_flow(monkeypatch, final)
    result = run(["build", "--drv", "/nix/store/aaaa-hello.drv", "--no-download", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["build_id"] == "12" and doc["succeeded"] is True
    assert doc["outputs"] == {"/nix/store/aaaa-hello.drv": {"out": "/nix/store/o-hello"}}


def test_build_failure_reports_step_and_log_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    final = {
        **BUILD,
        "state": "failed",
        "roots": [{**BUILD["roots"][0], "state": "failed"}],
        "failed_steps": [
            {
                "id": 4,
                "drv_path": "/nix/store/aaaa-hello.drv",
                "state": "failed",
                "outcome": "build_failure",
                "error": "builder exited 1",
                "log_tail": "compiling\n[error] boom\n",
            }
        ],
    }
    _fake_build_flow(monkeypatch, final)
    result = run(["build", "--drv", "/nix/store/aaaa-hello.drv", "--no-download"])
    assert result.exit_code == 1
    assert "not built: /nix/store/aaaa-hello.drv (failed)" in result.stderr
    assert "failed step 4: /nix/store/aaaa-hello.drv: build_failure, builder exited 1" in (
        result.stderr
    )
    assert "[error] boom" in result.stderr  # log text is not taken as rich markup
    assert "Error: build 12 failed: 1 of 1 requested derivation(s) did not build" in result.stderr


def test_failure_report_names_jobs_by_attribute_path(capsys: pytest.CaptureFixture[str]) -> None:
    from bigtent.apimodels import Build

    build = Build.model_validate(
        {**BUILD, "state": "failed", "roots": [{**BUILD["roots"][0], "state": "failed"}]}
    )
    report_failure(build, {"/nix/store/aaaa-hello.drv": ".#checks.x86_64-linux.hello"})
    assert (
        "  not built: .#checks.x86_64-linux.hello (/nix/store/aaaa-hello.drv) (failed)"
        in capsys.readouterr().err
    )


SUCCEEDED = {**BUILD, "state": "succeeded", "roots": [{**BUILD["roots"][0], "state": "succeeded"}]}


@pytest.mark.parametrize(
    ("links", "stdout"),
    [
        (
            [ResultLink("result", "/w/result"), ResultLink("result-2", "/w/result-2")],
            "/w/result\n/w/result-2\n",
        ),
        ([], "/nix/store/o-hello\n"),  # --no-out-link or --no-download: the output paths
    ],
)
def test_a_success_prints_its_links_else_its_output_paths(
    links: list[ResultLink], stdout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    report_result(BuildResult(Build.model_validate(SUCCEEDED), links=links))
    out = capsys.readouterr()
    assert (out.out, out.err) == (stdout, "")


def test_a_failure_prints_the_failure_report_only(capsys: pytest.CaptureFixture[str]) -> None:
    failed = {**BUILD, "state": "failed", "roots": [{**BUILD["roots"][0], "state": "failed"}]}
    report_result(BuildResult(Build.model_validate(failed), links=[ResultLink("result", "/w/r")]))
    out = capsys.readouterr()
    assert out.out == "" and "not built: /nix/store/aaaa-hello.drv (failed)" in out.err
