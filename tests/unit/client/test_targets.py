"""``bigtent build``'s targets (pure): the command line as nix-build and ``nix build`` read it,
attribute paths, the evaluator's arguments and its answer."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bigtent.apimodels import Build
from bigtent.client.reports import build_report, job_labels, job_states
from bigtent.client.targets import (
    JOBS_NIX,
    AutoArg,
    Evaluation,
    Job,
    Skipped,
    Targets,
    evaluate_targets,
    evaluation_args,
    evaluation_summary,
    file_expression,
    flake_attr_paths,
    format_attr_path,
    lacks_flakes,
    nix_string,
    parse_attr_path,
    parse_evaluation,
    parse_targets,
    split_installable,
)
from bigtent.errors import NixError, UsageError
from bigtent.nix.store import NixStore, command_line, evaluation_failure


@pytest.mark.parametrize(
    ("args", "kw", "expected"),
    [
        ((), {}, Targets(files=("./default.nix",))),
        (("x.nix",), {"attrs": ("a", "b")}, Targets(files=("x.nix",), attrs=("a", "b"))),
        ((), {"attrs": ("a",)}, Targets(files=("./default.nix",), attrs=("a",))),
        (("a.nix", "b.nix"), {}, Targets(files=("a.nix", "b.nix"))),
        ((), {"drvs": ("/nix/store/x.drv",)}, Targets(drvs=("/nix/store/x.drv",))),
        (("./f#a", ".#b"), {}, Targets(installables=("./f#a", ".#b"))),
        ((), {"expr": "import ./x.nix"}, Targets(expr="import ./x.nix")),
        # The example: -E with -A was refused as "two kinds of target".
        (
            (),
            {"expr": "import ./x.nix {}", "attrs": ("top",)},
            Targets(expr="import ./x.nix {}", attrs=("top",)),
        ),
        (
            ("dag.nix",),
            {
                "attrs": ("top",),
                "auto_args": (AutoArg("salt", "x", is_string=True), AutoArg("layers", "2")),
                "include": ("nixpkgs=/src",),
                "show_trace": True,
            },
            Targets(
                files=("dag.nix",),
                attrs=("top",),
                args=(AutoArg("salt", "x", is_string=True), AutoArg("layers", "2")),
                include=("nixpkgs=/src",),
                show_trace=True,
            ),
        ),
        (
            (".#checks",),
            {"include": ("x=/y",)},
            Targets(installables=(".#checks",), include=("x=/y",)),
        ),
    ],
)
def test_parse_targets(args: tuple[str, ...], kw: dict[str, Any], expected: Targets) -> None:
    assert parse_targets(args, **kw) == expected


@pytest.mark.parametrize(
    ("args", "kw", "message"),
    [
        (("x.nix",), {"drvs": ("/nix/store/x.drv",)}, "--drv takes no other target"),
        ((), {"drvs": ("/nix/store/x.drv",), "attrs": ("a",)}, "--drv takes no other target"),
        ((".#a",), {"attrs": ("b",)}, "name a flake's attribute in the installable"),
        ((".#a",), {"auto_args": (AutoArg("x", "1"),)}, "not to a flake"),
        (("a.nix", ".#b"), {}, "one kind of target"),
        (("a.nix",), {"expr": "1"}, "-E takes the place of a Nix file"),
        ((), {"auto_args": (AutoArg("not valid", "1"),)}, "must be a Nix identifier"),
        ((), {"auto_args": (AutoArg("__bigtentSpec", "1"),)}, "reserved"),
        ((), {"attrs": ("a..b",)}, "empty attribute name"),
        ((), {"attrs": ('a."b',)}, "missing closing quote"),
    ],
)
def test_parse_targets_refuses_mixtures(
    args: tuple[str, ...], kw: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        parse_targets(args, **kw)


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("", []),
        ("top", ["top"]),
        ("checks.x86_64-linux.unit", ["checks", "x86_64-linux", "unit"]),
        ('nodes."dag-3.4".out', ["nodes", "dag-3.4", "out"]),
        ("layers.0.1", ["layers", 0, 1]),
    ],
)
def test_attr_paths(text: str, parts: list[str | int]) -> None:
    assert parse_attr_path(text) == parts
    assert parse_attr_path(format_attr_path(parts)) == parts


def test_format_attr_path_quotes_only_what_needs_it() -> None:
    assert format_attr_path(["checks", "x86_64-linux", "a b"]) == 'checks.x86_64-linux."a b"'


def test_nix_string_escapes_interpolation_and_quotes() -> None:
    assert nix_string('/tmp/a "b" ${x} \\') == '"/tmp/a \\"b\\" \\${x} \\\\"'


def test_file_expression() -> None:
    assert file_expression("x.nix", "/work") == 'import "/work/x.nix"'
    assert file_expression("../y", "/work/sub") == 'import "/work/y"'
    assert file_expression("/abs/z.nix", "/work") == 'import "/abs/z.nix"'
    assert file_expression("<nixpkgs>", "/work") == "import <nixpkgs>"
    assert file_expression("https://example.org/x.tar.gz", "/w") == (
        'import (builtins.fetchTarball "https://example.org/x.tar.gz")'
    )


def test_split_installable() -> None:
    assert split_installable(".#checks.x86_64-linux", "/repo") == (
        "/repo",
        ["checks", "x86_64-linux"],
    )
    assert split_installable("./sub#hello", "/repo") == ("/repo/sub", ["hello"])
    assert split_installable("git+file:///r?dir=x#a", "/w") == ("git+file:///r?dir=x", ["a"])
    assert split_installable("github:o/r#", "/w") == ("github:o/r", [])
    with pytest.raises(UsageError, match="names no flake"):
        split_installable("#a", "/w")


def test_flake_attr_paths_follow_nix_build() -> None:
    assert flake_attr_paths([]) == [["packages", None, "default"], ["defaultPackage", None]]
    assert flake_attr_paths(["hello"]) == [
        ["packages", None, "hello"],
        ["legacyPackages", None, "hello"],
        ["hello"],
    ]


def test_evaluation_args_pass_everything_to_one_nix_instantiate() -> None:
    targets = parse_targets(
        (),
        expr="import ./x.nix {}",
        attrs=("top", "nodes.a"),
        auto_args=(AutoArg("salt", "s", is_string=True), AutoArg("n", "1 + 1")),
        include=("foo=/bar",),
        show_trace=True,
    )
    argv = evaluation_args(targets, "/work")
    assert argv[:5] == ["--eval", "--strict", "--json", "--read-write-mode", "--show-trace"]
    assert argv[5:8] == ["-I", "foo=/bar", str(JOBS_NIX)]
    spec = json.loads(argv[argv.index("__bigtentSpec") + 1])
    assert spec == {"roots": [{"kind": "nix", "paths": [["top"], ["nodes", "a"]]}]}
    assert argv[argv.index("__bigtentRoot0") + 1] == "import ./x.nix {}"
    assert argv[-6:] == ["--argstr", "salt", "s", "--arg", "n", "1 + 1"]


def test_evaluation_args_for_flakes() -> None:
    argv = evaluation_args(parse_targets((".#checks.x86_64-linux", "/f#")), "/repo")
    spec = json.loads(argv[argv.index("__bigtentSpec") + 1])
    assert [r["ref"] for r in spec["roots"]] == ["/repo", "/f"]
    assert spec["roots"][1]["paths"] == flake_attr_paths([])
    assert argv[argv.index("__bigtentRoot1") + 1] == 'builtins.getFlake "/f"'


def test_parse_evaluation_names_each_job_by_attribute_path() -> None:
    targets = parse_targets((".#checks",))
    answer = {
        "jobs": [
            {"target": 0, "attr": ["checks", "unit"], "drvPath": "/nix/store/a-unit.drv"},
            {"target": 0, "attr": ["checks", "also"], "drvPath": "/nix/store/a-unit.drv"},
        ],
        "skipped": [{"target": 0, "attr": ["checks", "note"], "type": "string"}],
    }
    ev = parse_evaluation(json.dumps(answer), targets, "warning: dirty\n")
    assert [j.label for j in ev.jobs] == [".#checks.unit", ".#checks.also"]
    assert ev.drv_paths == ["/nix/store/a-unit.drv"]
    assert ev.skipped[0].attr == "checks.note" and ev.warnings == "warning: dirty"
    assert job_labels(ev.jobs) == {"/nix/store/a-unit.drv": ".#checks.unit, .#checks.also"}


def test_evaluation_summary() -> None:
    one = Evaluation(jobs=(Job("x.nix", "top", "/nix/store/a-top.drv"),))
    assert evaluation_summary(one) == []
    jobs = tuple(Job(".#c", f"c.j{i}", f"/nix/store/{i}-j.drv", flake_ref=".#c") for i in range(25))
    summary = evaluation_summary(
        Evaluation(jobs=jobs, skipped=(Skipped(".#c", "c.note", "string"),), warnings="w: dirty")
    )
    assert summary[0] == "w: dirty"
    assert summary[1].startswith("25 job(s): .#c.j0, .#c.j1, ") and summary[1].endswith(
        ".#c.j19 and 5 more"
    )
    assert summary[2:] == ["skipped c.note: a string, not a derivation or a set"]


def test_parse_evaluation_refuses_another_shape() -> None:
    with pytest.raises(NixError, match="unexpected answer"):
        parse_evaluation('{"jobs": [{}]}', Targets(files=("x.nix",)))
    bad = {"jobs": [{"target": 0, "attr": [], "drvPath": "hello"}], "skipped": []}
    with pytest.raises(NixError, match="no derivation path"):
        parse_evaluation(json.dumps(bad), Targets(files=("x.nix",)))


def test_jobs_in_the_json_report() -> None:
    build = Build.model_validate(
        {
            "id": 3,
            "state": "failed",
            "roots": [
                {"drv_path": "/nix/store/a-a.drv", "state": "succeeded", "outputs": {"out": "/o"}},
                {"drv_path": "/nix/store/b-b.drv", "state": "failed"},
            ],
        }
    )
    jobs = [
        Job("x.nix", "a", "/nix/store/a-a.drv"),
        Job("x.nix", "set.b", "/nix/store/b-b.drv"),
    ]
    assert job_states(build, jobs) == [
        {
            "attr": "a",
            "target": "x.nix",
            "drv_path": "/nix/store/a-a.drv",
            "state": "succeeded",
            "built": True,
            "outputs": {"out": "/o"},
        },
        {
            "attr": "set.b",
            "target": "x.nix",
            "drv_path": "/nix/store/b-b.drv",
            "state": "failed",
            "built": False,
            "outputs": {},
        },
    ]
    assert build_report(build, jobs=jobs)["jobs"][1]["attr"] == "set.b"


async def test_drv_targets_are_checked_without_nix() -> None:
    with pytest.raises(UsageError, match="--drv needs"):
        await evaluate_targets(NixStore(), Targets(drvs=("/nix/store/abc-hello",)))
    ev = await evaluate_targets(NixStore(), Targets(drvs=("/nix/store/abc-hello.drv",)))
    assert ev.drv_paths == ["/nix/store/abc-hello.drv"] and ev.jobs[0].attr is None


async def test_missing_file_is_a_usage_error(tmp_path: Any) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        await evaluate_targets(NixStore(), Targets(files=("none.nix",)), cwd=str(tmp_path))


@pytest.mark.parametrize(
    ("stderr", "lacks"),
    [
        ("error: unknown experimental feature 'flakes'", True),
        ("error: experimental Nix feature 'flakes' is disabled; use ...", True),
        ("error: unrecognised flag '--extra-experimental-features'", True),
        ("error: attribute 'getFlake' missing, at (string):1:1", True),
        ("error: flake 'x' does not provide attribute 'y'", False),
        ("error: undefined variable 'foo'", False),
    ],
)
def test_lacks_flakes(stderr: str, lacks: bool) -> None:
    assert lacks_flakes(stderr) is lacks


async def test_flake_without_flake_support_is_explained() -> None:
    class NoFlakes(NixStore):
        async def evaluate(self, args: Any, *, features: Any = ()) -> tuple[str, str]:
            raise NixError(
                "evaluation failed", stderr="error: unknown experimental feature 'flakes'"
            )

    with pytest.raises(NixError, match="cannot evaluate flake references"):
        await evaluate_targets(NoFlakes(), Targets(installables=(".#a",)))


def test_command_line_is_whole_and_quoted_until_it_is_too_long() -> None:
    assert command_line(["nix-instantiate", "--arg", "x", "import ./a b"]) == (
        "nix-instantiate --arg x 'import ./a b'"
    )
    long = ["nix", "path-info", *(f"/nix/store/{i:040d}-p" for i in range(200))]
    text = command_line(long, limit=200)
    assert text.startswith("nix path-info /nix/store/") and text.endswith("more arguments)")
    assert len(text) < 260


def test_evaluation_failure_keeps_nix_whole_message() -> None:
    stderr = (
        "error: undefined variable 'foo'\n\n       at /w/bad.nix:1:61:\n\n"
        "            1| { }: foo\n             |      ^\n"
    )
    text = evaluation_failure(["nix-instantiate", "--eval", "/w/j.nix"], 1, stderr)
    assert text.splitlines() == [
        "evaluation failed (exit 1):",
        "error: undefined variable 'foo'",
        "",
        "       at /w/bad.nix:1:61:",
        "",
        "            1| { }: foo",
        "             |      ^",
        "command: nix-instantiate --eval /w/j.nix",
    ]
