"""Evaluating a commit: fetch it into the runner's git mirror, then one ``nix eval`` that
enumerates the jobs and instantiates them into the runner's evaluation store.

The Nix process runs off the event loop (a subprocess), with an operating-system memory limit
(``[evaluation] max_memory_mib``), a wall-clock timeout and an abort (a superseded
evaluation stops), at most ``max_concurrent`` at once. Evaluation is pure: a flake is
``builtins.getFlake "git+file://MIRROR?ref=…&rev=SHA"`` (locked by its revision), a file project
``builtins.fetchGit`` of the same. Pure evaluation alone does not keep the project's Nix code
from the runner's files (``fetchTree { type = "path"; … narHash }`` counts as locked): with
``[evaluation] sandbox = "bwrap"`` (the default) the Nix process runs under bubblewrap and sees
only the system, the project's own mirror and the evaluation store (``bigtent.nix.sandbox``,
docs/security.md "CI evaluation"). Without a working sandbox only trusted evaluations run.

Jobs are enumerated in that one process, recursing into attribute sets (``hydraJobs``,
``checks.<system>``), each job under ``builtins.tryEval`` so a job that throws is a job
error, not an evaluation error. ``parse_jobs`` and ``eval_expression`` are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bigtent.config.ci import (
    EvalSandboxKind,
    EvaluationSection,
    ProjectSection,
    redact_url_credentials,
)
from bigtent.errors import BigtentError
from bigtent.nix.sandbox import BWRAP, EvalSandbox
from bigtent.nix.store import BoundedEval, BoundedRun, NixStore, probe_sandbox

log = logging.getLogger(__name__)

MAX_DEPTH = 8
"""How deep below a flake output (or a file's attribute) jobs are looked for."""
PER_SYSTEM = ("checks", "packages", "devShells", "formatter")
"""Flake outputs keyed by system first: only the project's ``systems`` are walked."""
GIT_TIMEOUT_SECS = 600.0
ERROR_DETAILS = 20
"""Jobs that failed to evaluate whose full Nix message is fetched (one ``nix eval`` each)."""
ERROR_DETAIL_SECS = 120.0
STDOUT_BYTES_PER_JOB = 1024
PROBE_SECS = 30.0

_ENUMERATE = r"""
let
  p = builtins.fromJSON "@PARAMS@";
  isDrv = v: builtins.isAttrs v && (v.type or null) == "derivation";
  failed = path: { attr = path; error = "evaluation failed (a throw or an assertion)"; };
  walk = path: depth: v:
    let t = builtins.tryEval v; in
    if !t.success then [ (failed path) ]
    else if isDrv t.value then
      let d = builtins.tryEval t.value.drvPath; in
      [ (if d.success then { attr = path; drvPath = d.value; } else failed path) ]
    else if builtins.isAttrs t.value && depth > 0 then
      builtins.concatLists (map (n: walk (path ++ [ n ]) (depth - 1) t.value.${n})
        (builtins.attrNames t.value))
    else [ ];
  top = name: v:
    if builtins.elem name p.perSystem && builtins.isAttrs v then
      builtins.concatLists (map (s: if v ? ${s} then walk [ name s ] p.maxDepth v.${s} else [ ])
        p.systems)
    else walk [ name ] p.maxDepth v;
  root =
    if p.kind == "flake" then (builtins.getFlake p.flakeRef).outputs
    else
      let
        src = builtins.fetchGit { url = p.url; ref = p.ref; rev = p.rev; };
        v0 = import (src + "/${p.file}");
      in if builtins.isFunction v0 then v0 { } else v0;
  select = builtins.foldl' (v: n: v.${n}) root;
  jobs =
    if p.kind == "flake" then
      builtins.concatLists (map (a: if root ? ${a} then top a root.${a} else [ ]) p.attrs)
    else walk p.attrPath p.maxDepth (select p.attrPath);
in if p.only != null then (select p.only).drvPath else jobs
"""


def nix_string_body(text: str) -> str:
    """``text`` escaped for the inside of a Nix double-quoted string (no interpolation)."""
    return (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("$", "\\$")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )


def mirror_ref(commit_sha: str) -> str:
    """The ref the mirror keeps for a fetched commit (Nix's git fetcher needs a ref)."""
    return f"refs/bigtent/{commit_sha}"


def eval_expression(
    project: ProjectSection, mirror: Path, commit_sha: str, only: list[str] | None = None
) -> str:
    """The Nix expression that lists the jobs of ``commit_sha`` (pure); with ``only`` (an
    attribute path) the ``drvPath`` of that one job, without ``tryEval``, so that Nix prints
    its full message for a job that fails."""
    ref = mirror_ref(commit_sha)
    params = {
        "kind": project.evaluate.value,
        "flakeRef": f"git+file://{mirror}?ref={ref}&rev={commit_sha}",
        "url": f"file://{mirror}",
        "ref": ref,
        "rev": commit_sha,
        "attrs": project.flake_attrs,
        "systems": project.systems,
        "perSystem": list(PER_SYSTEM),
        "file": project.file,
        "attrPath": project.attr.split(".") if project.attr else [],
        "maxDepth": MAX_DEPTH,
        "only": only,
    }
    return _ENUMERATE.replace("@PARAMS@", nix_string_body(json.dumps(params)))


@dataclass(frozen=True, slots=True)
class Job:
    attr: str
    drv_path: str | None = None
    error: str | None = None
    parts: tuple[str, ...] = ()
    """The attribute path's names."""


class EvalFailure(BigtentError):
    """The evaluation itself failed: Nix's message, or the limit it hit."""

    def __init__(self, message: str, *, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind  # "error", "memory", "timeout", "aborted", "fetch", "too_many"


_ATTR_SAFE = re.compile(r"[A-Za-z_][A-Za-z0-9_'-]*")


def attr_path(parts: list[str]) -> str:
    """An attribute path as Nix writes it: names joined by dots, odd names quoted."""
    return ".".join(p if _ATTR_SAFE.fullmatch(p) else json.dumps(p) for p in parts)


def parse_jobs(stdout: bytes, max_jobs: int) -> list[Job]:
    """The jobs ``nix eval`` printed (pure); EvalFailure when the answer is not the expected
    list or has more than ``max_jobs`` jobs."""
    try:
        data = json.loads(stdout)
    except ValueError as exc:
        raise EvalFailure(f"nix eval printed no JSON: {exc}") from exc
    if not isinstance(data, list):
        raise EvalFailure("nix eval printed no list of jobs")
    if len(data) > max_jobs:
        raise EvalFailure(
            f"{len(data)} jobs, more than evaluation.max_jobs = {max_jobs}", kind="too_many"
        )
    jobs: dict[str, Job] = {}
    for item in data:
        parts = item.get("attr") if isinstance(item, dict) else None
        if not isinstance(parts, list) or not all(isinstance(x, str) for x in parts):
            raise EvalFailure("nix eval printed a job without an attribute path")
        name = attr_path(parts)
        drv = item.get("drvPath")
        if isinstance(drv, str) and drv.startswith("/nix/store/") and drv.endswith(".drv"):
            jobs[name] = Job(name, drv_path=drv, parts=tuple(parts))
        else:
            error = str(item.get("error") or "not a derivation")
            jobs[name] = Job(name, error=error, parts=tuple(parts))
    return sorted(jobs.values(), key=lambda j: j.attr)


def judge_run(run: BoundedRun, limits: EvaluationSection) -> list[Job]:
    """The jobs of a finished ``nix eval``, or the EvalFailure it was (pure)."""
    if run.aborted:
        raise EvalFailure("evaluation stopped: superseded or cancelled", kind="aborted")
    if run.timed_out:
        raise EvalFailure(
            f"evaluation exceeded evaluation.timeout_secs = {limits.timeout_secs:g} s and was "
            "killed",
            kind="timeout",
        )
    if run.out_of_memory:
        raise EvalFailure(
            f"evaluation exceeded evaluation.max_memory_mib = {limits.max_memory_mib} MiB and "
            f"was stopped by the memory limit:\n{run.stderr.strip()}",
            kind="memory",
        )
    if run.stdout_limit:
        raise EvalFailure("the list of jobs is too large", kind="too_many")
    if run.exit_code != 0:
        raise EvalFailure(run.stderr.strip() or f"nix eval failed (exit {run.exit_code})")
    return parse_jobs(run.stdout, limits.max_jobs)


# ---- the processes ----------------------------------------------------------------------


class Evaluator:
    """Fetches and evaluates commits; owns the runner's git mirrors and evaluation store
    (``STATE/ci``)."""

    def __init__(
        self, state_dir: Path, limits: EvaluationSection, nix_options: dict[str, str]
    ) -> None:
        self.root = state_dir / "ci"
        self.limits = limits
        self.slots = asyncio.Semaphore(limits.max_concurrent)
        store_dir = self.root / "eval-store"
        self.store_dir = store_dir
        self.bwrap = BWRAP
        self.store = NixStore(
            store=f"local?root={store_dir}",
            options={"substituters": "", **nix_options},
            env={"XDG_CACHE_HOME": str(self.root / "xdg"), "GIT_TERMINAL_PROMPT": "0"},
        )
        self.sandbox_problem: str | None = (
            None if limits.sandbox is EvalSandboxKind.BWRAP else 'evaluation.sandbox = "none"'
        )
        """Why evaluations run without a sandbox (None: they run in one); set by ``probe``."""

    def sandbox_for(self, mirror: Path) -> EvalSandbox | None:
        """The file system of one evaluation of the project whose mirror is ``mirror`` (None:
        no sandbox, ``evaluation.sandbox = "none"`` or bwrap is missing)."""
        if self.sandbox_problem is not None:
            return None
        xdg = self.xdg_dir(mirror)
        return EvalSandbox(
            read_only=(mirror,),
            read_write=(self.store_dir, xdg),
            network=self.limits.network,
            extra_env={**self.store.env, "XDG_CACHE_HOME": str(xdg)},
            bwrap=self.bwrap,
        )

    def xdg_dir(self, mirror: Path) -> Path:
        """Nix's cache directory (git clones, the fetcher cache) of one project: never shared,
        so one project's evaluation cannot reach another's fetched sources through it."""
        return self.root / "xdg" / mirror.name.removesuffix(".git")

    @property
    def refuses_untrusted(self) -> bool:
        """The sandbox is configured but does not work: untrusted evaluations are refused."""
        return self.limits.sandbox is EvalSandboxKind.BWRAP and self.sandbox_problem is not None

    @property
    def isolated(self) -> bool:
        """Evaluations run in the sandbox (untrusted ones are evaluated only then)."""
        return self.sandbox_problem is None

    async def probe(self) -> str | None:
        """Check at start that the sandbox works (``nix --version`` in it); on failure record
        and return why (evaluations then run unsandboxed, trusted ones only)."""
        if self.limits.sandbox is EvalSandboxKind.NONE:
            return self.sandbox_problem
        for path in (self.store_dir, self.root / "xdg", self.root / "git"):
            path.mkdir(parents=True, exist_ok=True)
        sandbox = EvalSandbox(
            read_only=(self.root / "git",), network=self.limits.network, bwrap=self.bwrap
        )
        problem = await probe_sandbox(sandbox, PROBE_SECS)
        self.sandbox_problem = problem
        return problem

    def mirror(self, project: str) -> Path:
        return self.root / "git" / f"{project}.git"

    async def fetch(self, project: ProjectSection, fetch_ref: str, commit_sha: str) -> Path:
        """Make ``commit_sha`` present in the project's bare mirror under ``mirror_ref``."""
        mirror = self.mirror(project.name)
        if not (mirror / "HEAD").exists():
            mirror.parent.mkdir(parents=True, exist_ok=True)
            await _git(None, "init", "--quiet", "--bare", str(mirror))
        if not await _has_commit(mirror, commit_sha):
            try:
                await _git(mirror, "fetch", "--quiet", "--no-tags", project.url, fetch_ref)
            except EvalFailure:
                if await _has_commit(mirror, commit_sha):
                    pass
                else:
                    await _git(mirror, "fetch", "--quiet", "--no-tags", project.url, commit_sha)
            if not await _has_commit(mirror, commit_sha):
                raise EvalFailure(
                    f"commit {commit_sha} is not at {fetch_ref} of {project.url} (force-pushed "
                    "away?)",
                    kind="fetch",
                )
        await _git(mirror, "update-ref", mirror_ref(commit_sha), commit_sha)
        return mirror

    async def evaluate(
        self,
        project: ProjectSection,
        fetch_ref: str,
        commit_sha: str,
        abort: asyncio.Event | None = None,
    ) -> tuple[list[Job], int]:
        """The commit's jobs, instantiated into the evaluation store, and the Nix process's
        peak resident memory; EvalFailure otherwise."""
        async with self.slots:
            mirror = await self.fetch(project, fetch_ref, commit_sha)
            for path in (self.store_dir, self.xdg_dir(mirror)):
                path.mkdir(parents=True, exist_ok=True)
            run = await BoundedEval(self.store).run(
                eval_expression(project, mirror, commit_sha),
                max_memory_bytes=self.limits.max_memory_mib * 1024 * 1024,
                timeout_secs=self.limits.timeout_secs,
                max_stdout_bytes=self.limits.max_jobs * STDOUT_BYTES_PER_JOB,
                abort=abort,
                sandbox=self.sandbox_for(mirror),
            )
            jobs = judge_run(run, self.limits)
            failed = [j for j in jobs if j.error][:ERROR_DETAILS]
            if not failed:
                return jobs, run.peak_rss_bytes
            messages = {
                j.attr: await self._job_error(project, mirror, commit_sha, j, abort) for j in failed
            }
            detailed = [
                dataclasses.replace(j, error=messages[j.attr]) if messages.get(j.attr) else j
                for j in jobs
            ]
            return detailed, run.peak_rss_bytes

    async def _job_error(
        self,
        project: ProjectSection,
        mirror: Path,
        commit_sha: str,
        job: Job,
        abort: asyncio.Event | None,
    ) -> str | None:
        """Nix's full message for a job that failed under ``tryEval`` (one more ``nix eval``
        of that job alone); None when it cannot be had."""
        run = await BoundedEval(self.store).run(
            eval_expression(project, mirror, commit_sha, only=list(job.parts)),
            max_memory_bytes=self.limits.max_memory_mib * 1024 * 1024,
            timeout_secs=min(self.limits.timeout_secs, ERROR_DETAIL_SECS),
            max_stdout_bytes=STDOUT_BYTES_PER_JOB,
            abort=abort,
            show_trace=True,
            sandbox=self.sandbox_for(mirror),
        )
        if run.exit_code == 0 or run.timed_out or run.aborted or not run.stderr.strip():
            return None
        return run.stderr.strip()


async def _has_commit(mirror: Path, sha: str) -> bool:
    with contextlib.suppress(EvalFailure):
        await _git(mirror, "cat-file", "-e", f"{sha}^{{commit}}")
        return True
    return False


async def _git(cwd: Path | None, *args: str) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false"}
    proc = await asyncio.create_subprocess_exec(
        "git",
        *args,
        cwd=str(cwd) if cwd else None,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), GIT_TIMEOUT_SECS)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await proc.wait()
        raise EvalFailure(f"git {args[0]} timed out", kind="fetch") from None
    if proc.returncode != 0:
        text = redact_url_credentials(err.decode(errors="replace").strip())
        raise EvalFailure(f"git {args[0]} failed: {text}", kind="fetch")
    return out.decode(errors="replace")


async def ls_remote(url: str, refs: list[str]) -> dict[str, str]:
    """``git ls-remote URL REFS``: ref -> commit (polling); EvalFailure when it fails."""
    out = await _git(None, "ls-remote", url, *refs)
    found: dict[str, str] = {}
    for line in out.splitlines():
        sha, _, ref = line.partition("\t")
        if sha and ref:
            found[ref] = sha
    return found


async def default_branch(url: str) -> str:
    """The branch the remote's HEAD points at ("" when it does not say)."""
    out = await _git(None, "ls-remote", "--symref", url, "HEAD")
    for line in out.splitlines():
        if line.startswith("ref: ") and line.endswith("\tHEAD"):
            return line[len("ref: ") :].split("\t")[0].removeprefix("refs/heads/")
    return ""
