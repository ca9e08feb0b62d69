"""``bigtent build``'s targets, as nix-build and ``nix build`` take them, evaluated to jobs.

A target is a Nix file (or ``-E`` expression) with ``-A`` attribute paths, ``--arg`` /
``--argstr`` values for a function at the top and ``-I`` search path entries; a flake
installable ``REF#ATTR``; or a store derivation (``--drv``). All of them are evaluated by one
Nix process (``jobs.nix`` under ``nix-instantiate --eval --strict --json --read-write-mode``),
which writes the .drv files and answers each job with its attribute path. An attribute that
names a set of derivations builds all of them: nix-build's rules for files (the set's
derivations, and the sets with ``recurseForDerivations = true``), Hydra's job enumeration for
flakes (every set that is not a derivation is entered, other values are skipped).

Parsing and the argument list are pure; ``evaluate_targets`` runs Nix through ``NixStore``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigtent.errors import NixError, UsageError
from bigtent.nix.store import NixStore

JOBS_NIX = Path(__file__).with_name("jobs.nix")
"""The evaluator: reads the spec and the roots, answers ``{jobs, skipped}`` as JSON."""
RESERVED_PREFIX = "__bigtent"
"""Argument names jobs.nix keeps for itself (never passed to the user's function)."""
FLAKE_FEATURES = ("--extra-experimental-features", "nix-command flakes")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_'-]*")
_LOOKUP_PATH = re.compile(r"<[^<>\s]+>")
_URL = re.compile(r"(https?|file)://\S+")


@dataclass(frozen=True, slots=True)
class AutoArg:
    """``--arg NAME EXPR`` (``is_string`` False) or ``--argstr NAME VALUE``."""

    name: str
    value: str
    is_string: bool = False


@dataclass(frozen=True, slots=True)
class Targets:
    """What the user asked to build: Nix files or one expression (with ``attrs``), flake
    installables, or store derivations; never two of those kinds."""

    files: tuple[str, ...] = ()
    expr: str | None = None
    attrs: tuple[str, ...] = ()
    drvs: tuple[str, ...] = ()
    installables: tuple[str, ...] = ()
    args: tuple[AutoArg, ...] = ()
    include: tuple[str, ...] = ()
    """``-I`` search path entries (``PATH`` or ``NAME=PATH``), in order."""
    show_trace: bool = False


_KINDS = (
    "give one kind of target: FILE.nix [-A ATTR]..., -E EXPR [-A ATTR]..., "
    "FLAKEREF#ATTR..., or --drv PATH..."
)


def parse_targets(
    args: Sequence[str],
    *,
    attrs: Sequence[str] = (),
    drvs: Sequence[str] = (),
    expr: str | None = None,
    auto_args: Sequence[AutoArg] = (),
    include: Sequence[str] = (),
    show_trace: bool = False,
) -> Targets:
    """Sort the command line into one kind of target, as nix-build and ``nix build`` read it.

    Positional arguments with ``#`` are flake installables, others Nix files (or directories,
    ``<nixpkgs>``-style lookup paths, URLs of tarballs); none means ``./default.nix``. ``-E``
    takes the place of the files; ``-A``, ``--arg`` and ``--argstr`` apply to files and ``-E``.
    Anything else is a ``UsageError`` (exit 2).
    """
    flakes = tuple(a for a in args if "#" in a)
    files = tuple(a for a in args if "#" not in a)
    if drvs:
        if args or expr is not None or attrs or auto_args:
            raise UsageError(f"--drv takes no other target, -A, --arg or --argstr; {_KINDS}")
        return Targets(drvs=tuple(drvs), show_trace=show_trace)
    if flakes:
        if files or expr is not None:
            raise UsageError(_KINDS)
        if attrs:
            raise UsageError(
                "-A selects attributes of a Nix file or -E expression; name a flake's "
                f"attribute in the installable instead, e.g. .#{attrs[0]}"
            )
        if auto_args:
            raise UsageError(
                "--arg and --argstr apply to a Nix file or -E expression, not to a flake"
            )
        return Targets(installables=flakes, include=tuple(include), show_trace=show_trace)
    if expr is not None and files:
        raise UsageError(f"-E takes the place of a Nix file (got {' '.join(files)}); {_KINDS}")
    for arg in auto_args:
        if not _IDENTIFIER.fullmatch(arg.name):
            raise UsageError(f"--arg/--argstr name must be a Nix identifier (got {arg.name!r})")
        if arg.name.startswith(RESERVED_PREFIX):
            raise UsageError(f"argument names starting with {RESERVED_PREFIX} are reserved")
    for attr in attrs:
        parse_attr_path(attr)  # a malformed path is a usage error now, not an evaluation error
    return Targets(
        files=() if expr is not None else (files or ("./default.nix",)),
        expr=expr,
        attrs=tuple(attrs),
        args=tuple(auto_args),
        include=tuple(include),
        show_trace=show_trace,
    )


def parse_attr_path(text: str) -> list[str | int]:
    """nix-build's attribute path: names separated by dots, a name in double quotes may hold
    dots, and a number is a list index. ``""`` is the value itself."""
    if text == "":
        return []
    parts: list[str | int] = []
    current = ""
    quoted = False
    was_quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
            was_quoted = True
        elif char == "." and not quoted:
            parts.append(_component(current, was_quoted, text))
            current, was_quoted = "", False
        else:
            current += char
    if quoted:
        raise UsageError(f"missing closing quote in attribute path {text!r}")
    parts.append(_component(current, was_quoted, text))
    return parts


def _component(name: str, quoted: bool, text: str) -> str | int:
    if name == "":
        raise UsageError(f"empty attribute name in attribute path {text!r}")
    if name.isascii() and name.isdigit():
        return int(name)
    return name


def format_attr_path(parts: Sequence[str | int]) -> str:
    """The attribute path as a user types it (``checks.x86_64-linux.unit``; names that are no
    plain identifier are quoted)."""
    out = []
    for part in parts:
        text = str(part)
        out.append(text if _IDENTIFIER.fullmatch(text) or text.isdigit() else json.dumps(text))
    return ".".join(out)


def nix_string(text: str) -> str:
    """A Nix string literal holding ``text`` exactly (``\\``, ``"`` and ``$`` escaped)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'


def file_expression(file: str, cwd: str) -> str:
    """How nix-build reads a file argument, as an expression: a path (relative to ``cwd``; a
    directory means its default.nix), a ``<name>`` lookup path, or a tarball URL."""
    if _LOOKUP_PATH.fullmatch(file):
        return f"import {file}"
    if _URL.fullmatch(file):
        return f"import (builtins.fetchTarball {nix_string(file)})"
    return f"import {nix_string(os.path.normpath(os.path.join(cwd, file)))}"


def split_installable(text: str, cwd: str) -> tuple[str, list[str]]:
    """``REF#ATTR`` → (an absolute flake reference, the attribute path). A reference that is a
    path (``.``, ``./sub``, ``../x``, ``/abs``) is made absolute against ``cwd``, as ``nix
    build`` reads it (``builtins.getFlake`` needs an absolute one)."""
    ref, _, fragment = text.partition("#")
    if ref == "":
        raise UsageError(f"flake installable {text!r} names no flake (e.g. .#{fragment})")
    if ref.startswith((".", "/")) or ref == "~" or ref.startswith("~/"):
        ref = os.path.normpath(os.path.join(cwd, os.path.expanduser(ref)))
    path = [str(p) for p in parse_attr_path(fragment)] if fragment else []
    return ref, path


def flake_attr_paths(fragment: Sequence[str]) -> list[list[str | None]]:
    """The attribute paths ``nix build REF#FRAGMENT`` tries, in order: the default package
    for an empty fragment, else ``packages.SYSTEM.F``, ``legacyPackages.SYSTEM.F``, then ``F``
    itself. None stands for the current system (jobs.nix puts ``builtins.currentSystem``)."""
    if not fragment:
        return [["packages", None, "default"], ["defaultPackage", None]]
    return [["packages", None, *fragment], ["legacyPackages", None, *fragment], [*fragment]]


def evaluation_args(targets: Targets, cwd: str) -> list[str]:
    """The ``nix-instantiate`` arguments that evaluate ``targets`` with jobs.nix (pure)."""
    roots: list[dict[str, Any]] = []
    values: list[str] = []
    if targets.installables:
        for installable in targets.installables:
            ref, fragment = split_installable(installable, cwd)
            roots.append({"kind": "flake", "ref": ref, "paths": flake_attr_paths(fragment)})
            values.append(f"builtins.getFlake {nix_string(ref)}")
    else:
        paths = [parse_attr_path(a) for a in targets.attrs] or [[]]
        sources = [targets.expr] if targets.expr is not None else list(targets.files)
        for source in sources:
            roots.append({"kind": "nix", "paths": paths})
            values.append(source if targets.expr is not None else file_expression(source, cwd))
    argv = ["--eval", "--strict", "--json", "--read-write-mode"]
    if targets.show_trace:
        argv.append("--show-trace")
    for entry in targets.include:
        argv += ["-I", entry]
    argv.append(str(JOBS_NIX))
    argv += ["--argstr", f"{RESERVED_PREFIX}Spec", json.dumps({"roots": roots})]
    for index, value in enumerate(values):
        argv += ["--arg", f"{RESERVED_PREFIX}Root{index}", value]
    for arg in targets.args:
        argv += ["--argstr" if arg.is_string else "--arg", arg.name, arg.value]
    return argv


def target_names(targets: Targets) -> list[str]:
    """The name of each root, in the order jobs.nix numbers them."""
    if targets.installables:
        return list(targets.installables)
    if targets.expr is not None:
        return ["-E expression"]
    return list(targets.files)


# ---- the answer -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Job:
    """One derivation to build and where it was found."""

    target: str
    """The file, ``-E expression``, flake installable or .drv path it came from."""
    attr: str | None
    """Its attribute path (``checks.x86_64-linux.unit``); None for ``--drv``."""
    drv_path: str
    name: str = ""
    flake_ref: str | None = None

    @property
    def label(self) -> str:
        """How the job is named to the user: its attribute path (``REF#PATH`` for a flake's;
        the target itself for a file or expression that is one derivation)."""
        if self.attr is None:
            return self.drv_path
        if self.flake_ref is not None:
            return f"{self.target.partition('#')[0]}#{self.attr}"
        return self.attr or self.target

    def as_json(self) -> dict[str, Any]:
        return {"attr": self.attr, "target": self.target, "drv_path": self.drv_path}


@dataclass(frozen=True, slots=True)
class Skipped:
    """A value of a flake's job set that is neither a derivation nor a set (Hydra skips it)."""

    target: str
    attr: str
    type: str


@dataclass(frozen=True, slots=True)
class Evaluation:
    jobs: tuple[Job, ...]
    skipped: tuple[Skipped, ...] = ()
    warnings: str = ""
    """What Nix said on stderr while evaluating (trace output, a dirty git tree...)."""

    @property
    def drv_paths(self) -> list[str]:
        """The derivations to build, each once, in the order of their first job."""
        return list(dict.fromkeys(job.drv_path for job in self.jobs))


def parse_evaluation(stdout: str, targets: Targets, stderr: str = "") -> Evaluation:
    """jobs.nix's JSON answer as jobs (a ``NixError`` if it is not that shape)."""
    names = target_names(targets)
    try:
        data = json.loads(stdout)
        jobs = tuple(
            Job(
                target=names[int(j["target"])],
                attr=format_attr_path(list(j["attr"])),
                drv_path=str(j["drvPath"]),
                name=str(j.get("name", "")),
                flake_ref=names[int(j["target"])] if targets.installables else None,
            )
            for j in data["jobs"]
        )
        skipped = tuple(
            Skipped(names[int(s["target"])], format_attr_path(list(s["attr"])), str(s["type"]))
            for s in data["skipped"]
        )
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise NixError(f"unexpected answer from evaluating the targets: {exc}") from exc
    for job in jobs:
        if not (job.drv_path.startswith("/") and job.drv_path.endswith(".drv")):
            raise NixError(f"{job.label} evaluated to no derivation path ({job.drv_path!r})")
    return Evaluation(jobs=jobs, skipped=skipped, warnings=stderr.strip())


def _check_drv_path(arg: str) -> str:
    path = os.path.realpath(arg) if not arg.startswith("/nix/store/") else arg
    if not path.startswith("/nix/store/") or not path.endswith(".drv"):
        raise UsageError(f"--drv needs a store derivation /nix/store/….drv (got {arg!r})")
    return path


_NO_FLAKES = (
    "unknown experimental feature 'flakes'",
    "experimental nix feature 'flakes' is disabled",
    "unrecognised flag '--extra-experimental-features'",
    "unknown setting 'extra-experimental-features'",
    "attribute 'getflake' missing",
)
"""What a Nix without flake support (older than 2.4, or with flakes disabled) says."""


def lacks_flakes(stderr: str) -> bool:
    """Whether Nix failed because it cannot evaluate flakes (pure)."""
    text = stderr.lower()
    return any(hint in text for hint in _NO_FLAKES)


async def evaluate_targets(store: NixStore, targets: Targets, cwd: str | None = None) -> Evaluation:
    """The jobs of ``targets``, their .drv files written to the local store (one Nix process
    for all of them). An evaluation error is a ``NixError`` carrying Nix's whole message."""
    if targets.drvs:
        paths = [_check_drv_path(d) for d in targets.drvs]
        return Evaluation(jobs=tuple(Job(target=p, attr=None, drv_path=p) for p in paths))
    here = cwd if cwd is not None else os.getcwd()
    for file in targets.files:
        if _LOOKUP_PATH.fullmatch(file) or _URL.fullmatch(file):
            continue
        if not os.path.exists(os.path.join(here, file)):
            raise UsageError(f"Nix file {file} does not exist")
    argv = evaluation_args(targets, here)
    try:
        stdout, stderr = await store.evaluate(
            argv, features=FLAKE_FEATURES if targets.installables else ()
        )
    except NixError as exc:
        if targets.installables and lacks_flakes(exc.stderr):
            raise NixError(
                f"{exc.message}\nthis Nix cannot evaluate flake references (it needs flake "
                "support, Nix 2.4 or later); use FILE.nix -A ATTR or --drv PATH instead",
                argv=exc.argv,
                status=exc.status,
                stderr=exc.stderr,
            ) from exc
        raise
    evaluation = parse_evaluation(stdout, targets, stderr)
    if not evaluation.jobs:
        raise UsageError(f"the targets evaluated to no derivation{_skipped_note(evaluation)}")
    return evaluation


SUMMARY_SHOWN = 20
"""Jobs (and skipped values) named one by one in the summary; the rest are counted."""


def evaluation_summary(evaluation: Evaluation) -> list[str]:
    """The lines ``bigtent build`` prints after evaluating (pure): what Nix said on stderr,
    the jobs by attribute path when there are several or values were skipped, and each
    skipped value."""
    lines = [evaluation.warnings] if evaluation.warnings else []
    named = [job.label for job in evaluation.jobs if job.attr is not None]
    if len(named) > 1 or evaluation.skipped:
        more = len(named) - SUMMARY_SHOWN
        lines.append(
            f"{len(named)} job(s): {', '.join(named[:SUMMARY_SHOWN])}"
            + (f" and {more} more" if more > 0 else "")
        )
    for skip in evaluation.skipped[:SUMMARY_SHOWN]:
        lines.append(f"skipped {skip.attr}: a {skip.type}, not a derivation or a set")
    if len(evaluation.skipped) > SUMMARY_SHOWN:
        lines.append(f"skipped {len(evaluation.skipped) - SUMMARY_SHOWN} more")
    return lines


def _skipped_note(evaluation: Evaluation) -> str:
    if not evaluation.skipped:
        return ""
    shown = ", ".join(f"{s.attr} ({s.type})" for s in evaluation.skipped[:5])
    more = len(evaluation.skipped) - 5
    return f" (skipped: {shown}{f' and {more} more' if more > 0 else ''})"
