"""``bigtent build``'s targets evaluated by the real Nix (2.8) into a chroot store: nix-build's
-A / --arg / --argstr / -E / -I, a flake's set of derivations in a git repository, and Nix's
whole evaluation error. Each evaluation is one Nix process."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from bigtent.client.targets import AutoArg, Evaluation, evaluate_targets, parse_targets
from bigtent.errors import NixError, UsageError
from bigtent.nix.store import NixStore
from tests.conftest import current_system
from tests.unit.cli.helpers import run_cli

if shutil.which("nix-instantiate") is None:
    pytest.skip("nix-instantiate is not on PATH", allow_module_level=True)

pytestmark = pytest.mark.nix

SET_NIX = """\
{ salt ? "", n ? 1 }:
let
  mk = name: derivation {
    inherit name salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo ${name} ${toString n} > $out" ];
  };
in {
  top = mk "top";
  set = {
    a = mk "set-a"; b = mk "set-b"; note = "not a derivation"; inner = { c = mk "hidden"; };
  };
  deep = {
    recurseForDerivations = true;
    d = mk "deep-d";
    more = { recurseForDerivations = true; e = mk "deep-e"; };
  };
  list = [ (mk "list-0") [ (mk "list-1-0") ] ];
  needs = { required }: { x = mk required; };
}
"""

BAD_NIX = '{ }: { a = derivation { name = "a"; system = "x"; builder = foo; }; }\n'


class CountingStore(NixStore):
    """A NixStore that counts the Nix processes it starts (every start builds an argv)."""

    def __init__(self, root: Path) -> None:
        super().__init__(store=f"local?root={root}", options={"substituters": ""})
        self.started: list[list[str]] = []

    def command_argv(
        self, tool: str, args: Sequence[str], extra: Mapping[str, str] | None
    ) -> list[str]:
        argv = super().command_argv(tool, args, extra)
        self.started.append(argv)
        return argv


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "store")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "set.nix").write_text(SET_NIX)
    (work / "bad.nix").write_text(BAD_NIX)
    return work


def _valid(store: NixStore, ev: Evaluation) -> bool:
    return all(store.real_path(p).is_file() for p in ev.drv_paths)


def _names(ev: Evaluation) -> dict[str, str]:
    return {job.label: job.drv_path.split("-", 1)[1] for job in ev.jobs}


async def test_attribute_sets_follow_nix_build_in_one_nix_process(
    store: CountingStore, work: Path
) -> None:
    targets = parse_targets(
        ("set.nix",),
        attrs=("set", "deep", "list", "top"),
        auto_args=(AutoArg("salt", "s1", is_string=True), AutoArg("n", "1 + 2")),
    )
    ev = await evaluate_targets(store, targets, cwd=str(work))
    assert _names(ev) == {
        "set.a": "set-a.drv",  # a set's derivations; "note" and "inner" (no recurse) skipped
        "set.b": "set-b.drv",
        "deep.d": "deep-d.drv",  # recurseForDerivations = true is entered, at any depth
        "deep.more.e": "deep-e.drv",
        "list.0": "list-0.drv",  # lists are entered, nested lists too
        "list.1.0": "list-1-0.drv",
        "top": "top.drv",
    }
    assert len(store.started) == 1 and store.started[0][0] == "nix-instantiate"
    assert _valid(store, ev)  # the .drv files are in the store, ready to upload
    drv = store.real_path(next(j.drv_path for j in ev.jobs if j.attr == "top")).read_text()
    assert '"salt","s1"' in drv and "echo top 3" in drv  # --argstr and --arg reached the top


async def test_expression_with_attributes_and_search_path(store: CountingStore, work: Path) -> None:
    targets = parse_targets(
        (),
        expr="import <here/set.nix>",
        attrs=("needs.x", "top"),
        auto_args=(AutoArg("required", "from-arg", is_string=True),),
        include=(f"here={work}",),
    )
    ev = await evaluate_targets(store, targets, cwd=str(work))
    assert _names(ev) == {"needs.x": "from-arg.drv", "top": "top.drv"}
    assert len(store.started) == 1


async def test_a_file_that_is_one_derivation_is_named_by_the_file(
    store: CountingStore, work: Path
) -> None:
    (work / "one.nix").write_text(
        'derivation { name = "one"; system = "x"; builder = "/bin/sh"; }\n'
    )
    ev = await evaluate_targets(store, parse_targets(("one.nix",)), cwd=str(work))
    assert [job.label for job in ev.jobs] == ["one.nix"]


async def test_a_missing_attribute_is_nix_build_s_error(store: CountingStore, work: Path) -> None:
    with pytest.raises(NixError) as caught:
        await evaluate_targets(
            store, parse_targets(("set.nix",), attrs=("set.zzz",)), cwd=str(work)
        )
    assert "attribute 'zzz' in selection path 'set.zzz' not found" in caught.value.message


async def test_evaluation_error_shows_position_code_frame_and_command(
    store: CountingStore, work: Path
) -> None:
    with pytest.raises(NixError) as caught:
        await evaluate_targets(store, parse_targets(("bad.nix",)), cwd=str(work))
    lines = caught.value.message.splitlines()
    assert lines[0] == "evaluation failed (exit 1):"
    assert "error: undefined variable 'foo'" in lines
    assert f"       at {work}/bad.nix:1:61:" in lines
    code = next(line for line in lines if line.strip().startswith("1| { }: { a = derivation"))
    caret = lines[lines.index(code) + 1]
    assert caret.strip().startswith("|") and caret.index("^") == code.index("foo")
    command = lines[-1]
    assert command.startswith("command: nix-instantiate --store ")
    assert "--eval --strict --json --read-write-mode" in command
    assert f"__bigtentRoot0 'import \"{work}/bad.nix\"'" in command


async def test_show_trace_adds_nix_trace(store: CountingStore, work: Path) -> None:
    targets = parse_targets(("bad.nix",), show_trace=True)
    with pytest.raises(NixError) as caught:
        await evaluate_targets(store, targets, cwd=str(work))
    assert "--show-trace" in caught.value.argv
    assert "while evaluating" in caught.value.message


async def test_no_derivation_is_a_usage_error(store: CountingStore, work: Path) -> None:
    (work / "empty.nix").write_text("{ }: { a = 1; }\n")
    with pytest.raises(UsageError, match="evaluated to no derivation"):
        await evaluate_targets(store, parse_targets(("empty.nix",)), cwd=str(work))


# ---- flakes ----------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def make_flake(repo: Path, system: str, salt: str = "") -> Path:
    """A flake without inputs, committed in a new git repository."""
    repo.mkdir()
    (repo / "flake.nix").write_text(
        f"""{{
  outputs = {{ self }}: let
    system = "{system}";
    mk = name: derivation {{
      inherit name system;
      salt = "{salt}";
      builder = "/bin/sh";
      args = [ "-c" "echo ${{name}} > $out" ];
    }};
  in {{
    checks.${{system}} = {{
      unit = mk "unit";
      lint = mk "lint";
      nested = {{ deep = mk "deep"; }};
      note = "not a derivation";
      nothing = null;
    }};
    packages.${{system}} = {{ hello = mk "hello"; default = mk "default"; }};
    hydraJobs.tests.${{system}} = mk "hydra-test";
  }};
}}
"""
    )
    _git(repo, "init", "-q")
    _git(repo, "add", "flake.nix")
    _git(repo, "commit", "-q", "-m", "flake")
    return repo


@pytest.fixture
def flake(tmp_path: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("needs git")
    return make_flake(tmp_path / "repo", current_system())


async def test_flake_set_of_derivations_builds_each_by_attribute_path(
    store: CountingStore, flake: Path
) -> None:
    system = current_system()
    targets = parse_targets((f".#checks.{system}", ".#hydraJobs", ".#hello", ".#"))
    ev = await evaluate_targets(store, targets, cwd=str(flake))
    assert _names(ev) == {
        f".#checks.{system}.lint": "lint.drv",
        f".#checks.{system}.nested.deep": "deep.drv",
        f".#checks.{system}.unit": "unit.drv",
        f".#hydraJobs.tests.{system}": "hydra-test.drv",
        f".#packages.{system}.hello": "hello.drv",  # packages.SYSTEM.NAME as nix build does
        f".#packages.{system}.default": "default.drv",  # an empty fragment: the default
    }
    assert sorted((s.attr, s.type) for s in ev.skipped) == [
        (f"checks.{system}.note", "string"),
        (f"checks.{system}.nothing", "null"),
    ]
    assert len(store.started) == 1  # four installables, one Nix process
    assert _valid(store, ev)


async def test_flake_missing_attribute_names_the_candidates(
    store: CountingStore, flake: Path
) -> None:
    with pytest.raises(NixError) as caught:
        await evaluate_targets(store, parse_targets((f"{flake}#nope",)), cwd="/")
    system = current_system()
    assert (
        f"error: flake '{flake}' does not provide attribute 'packages.{system}.nope', "
        f"'legacyPackages.{system}.nope' or 'nope'"
    ) in caught.value.message


# ---- the command ---------------------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The client's Nix in a chroot store, and ``run_build`` answering at once with the
    derivations it was given as built (no runner)."""
    import bigtent.client.build as build_module
    from bigtent.apimodels import Build
    from bigtent.client.build import BuildResult

    async def fake_run_build(
        client: Any, store: Any, drvs: Any, options: Any, observer: Any, tracker: Any = None
    ) -> BuildResult:
        roots = [{"drv_path": d, "state": "succeeded", "outputs": {}} for d in drvs]
        return BuildResult(Build.model_validate({"id": 1, "state": "succeeded", "roots": roots}))

    monkeypatch.setattr(build_module, "run_build", fake_run_build)
    monkeypatch.chdir(tmp_path / "work")
    return {"NIX_REMOTE": f"local?root={tmp_path / 'store'}", "NIX_CONFIG": "substituters =\n"}


def test_build_expression_with_attribute_and_arguments(work: Path, cli_env: dict[str, str]) -> None:
    """The issue's command line: -E with -A, and --argstr / --arg, as nix-build takes them."""
    args = ["build", "--json", "--no-download", "-E", "import ./set.nix", "-A", "top", "-A"]
    args += ["set", "--argstr", "salt", "s2", "--arg", "n", "7"]
    result = run_cli(args, env=cli_env)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [(j["attr"], j["target"], j["built"]) for j in doc["jobs"]] == [
        ("top", "-E expression", True),
        ("set.a", "-E expression", True),
        ("set.b", "-E expression", True),
    ]
    drv = Path(cli_env["NIX_REMOTE"].removeprefix("local?root=") + doc["jobs"][0]["drv_path"])
    assert '"salt","s2"' in drv.read_text() and "echo top 7" in drv.read_text()


def test_build_evaluation_error_is_nix_whole_message(work: Path, cli_env: dict[str, str]) -> None:
    result = run_cli(["build", "bad.nix"], env=cli_env)
    assert result.exit_code == 1
    err = result.stderr.lstrip("\n")  # after the progress display's last line
    assert err.startswith("Error: evaluation failed (exit 1):\nerror: undefined variable 'foo'\n")
    assert f"at {work}/bad.nix:1:61:" in err and "1| { }: { a = derivation" in err
    assert "(use '--show-trace' to show detailed location information)" in err
    assert "command: nix-instantiate --store 'local?root=" in err and "Traceback" not in err
