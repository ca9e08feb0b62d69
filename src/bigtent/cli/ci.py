"""The commands of Nix CI (docs/ci.md): ``bigtent projects`` (and ``projects show|add|remove|
evaluate``), ``bigtent evals`` and ``bigtent jobs``."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from bigtent.cli.options import CONTEXT, ClientOptions, client_options, json_option
from bigtent.cli.output import emit
from bigtent.client.tables import Column, print_table
from bigtent.errors import UsageError


def _call(runner: ClientOptions, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    """One CI route's JSON object (``/api/v1`` + ``path``)."""
    return runner.call(lambda c: c.ci_json(method, path, **kwargs))


def _q(name: str) -> str:
    return quote(name, safe="")


def _short(sha: str | None) -> str:
    return (sha or "")[:12]


def _eval_row(e: dict[str, Any]) -> list[str]:
    return [
        str(e["id"]),
        e["ref"].removeprefix("refs/heads/"),
        _short(e["commit"]),
        e["state"],
        "" if e["trusted"] else "untrusted",
        str(e["build_id"] or ""),
        (e.get("error") or "").splitlines()[0][:80] if e.get("error") else "",
    ]


@click.group("projects", context_settings=CONTEXT, invoke_without_command=True)
@client_options
@json_option
@click.pass_context
def projects(ctx: click.Context, runner: ClientOptions, as_json: bool) -> None:
    """List the CI projects; add, remove, show and evaluate manage them."""
    if ctx.invoked_subcommand is not None:
        return
    data = _call(runner, "GET", "/projects")
    emit(as_json, data["projects"], lambda: _print_projects(data["projects"]))


def _print_projects(rows: list[dict[str, Any]]) -> None:
    print_table(
        [
            Column("name", key=True),
            Column("url"),
            Column("evaluate", key=True),
            Column("branches"),
            Column("forge", key=True),
            Column("source", key=True),
        ],
        [
            [
                p["name"],
                p["url"],
                p["evaluate"],
                ",".join(p["branches"]) or "(default)",
                p["forge"],
                p["source"],
            ]
            for p in rows
        ],
    )


@projects.command("show", context_settings=CONTEXT)
@click.argument("name")
@client_options
@json_option
def projects_show(name: str, runner: ClientOptions, as_json: bool) -> None:
    """A project, its branches and pull requests, and each one's latest evaluation."""
    data = _call(runner, "GET", f"/projects/{_q(name)}")
    emit(as_json, data, lambda: _print_project(data))


def _print_project(data: dict[str, Any]) -> None:
    click.echo(f"{data['name']}: {data['url']} ({data['evaluate']}, forge {data['forge']})")
    rows = []
    for r in data["refs"]:
        latest = r["latest"] or {}
        rows.append(
            [
                r["ref"],
                str(r["evaluations"]),
                str(latest.get("id", "")),
                _short(latest.get("commit")),
                latest.get("state", ""),
            ]
        )
    print_table([Column(h, key=True) for h in ("ref", "evals", "latest", "commit", "state")], rows)


@projects.command("add", context_settings=CONTEXT)
@click.argument("name")
@click.argument("url")
@click.option("--branch", "branches", multiple=True, help="A branch to build (repeat).")
@click.option("--file", "nix_file", help="Evaluate this Nix file instead of the flake.")
@click.option("--attr", default="", help="With --file: the attribute holding the jobs.")
@click.option(
    "--from-toml",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Every other setting from a TOML file (the keys of a [[projects]] entry).",
)
@client_options
@json_option
def projects_add(
    name: str,
    url: str,
    branches: tuple[str, ...],
    nix_file: str | None,
    attr: str,
    from_toml: Path | None,
    runner: ClientOptions,
    as_json: bool,
) -> None:
    """Add a project (admin token)."""
    body: dict[str, Any] = {}
    if from_toml is not None:
        try:
            body.update(tomllib.loads(from_toml.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"cannot read {from_toml}: {exc}") from exc
    body.update(name=name, url=url)
    if branches:
        body["branches"] = list(branches)
    if nix_file:
        body.update(evaluate="file", file=nix_file, attr=attr)
    data = _call(runner, "POST", "/projects", json_body=body)
    emit(as_json, data, f"added project {data['name']}")


@projects.command("remove", context_settings=CONTEXT)
@click.argument("name")
@client_options
@json_option
def projects_remove(name: str, runner: ClientOptions, as_json: bool) -> None:
    """Remove a project added through the API (admin token)."""
    data = _call(runner, "DELETE", f"/projects/{_q(name)}")
    emit(as_json, data, f"removed project {name}")


@projects.command("evaluate", context_settings=CONTEXT)
@click.argument("name")
@click.option("--branch", help="The branch (default: the first built branch).")
@client_options
@json_option
def projects_evaluate(name: str, branch: str | None, runner: ClientOptions, as_json: bool) -> None:
    """Evaluate a branch's current commit now (admin token)."""
    params = {"branch": branch} if branch else {}
    data = _call(runner, "POST", f"/projects/{_q(name)}/evaluate", params=params)
    if data["evaluation"] is None:
        line = "not evaluated (the branch is not built)"
    else:
        line = f"evaluation {data['evaluation']}"
    emit(as_json, data, line)


@click.command("evals", context_settings=CONTEXT)
@click.argument("project")
@click.option("--ref", help="Only this ref (e.g. refs/heads/main, refs/pull/3/head).")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@client_options
@json_option
def evals(project: str, ref: str | None, limit: int, runner: ClientOptions, as_json: bool) -> None:
    """A project's evaluations, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if ref:
        params["ref"] = ref
    data = _call(runner, "GET", f"/projects/{_q(project)}/evaluations", params=params)
    emit(as_json, data["evaluations"], lambda: _print_evaluations(data["evaluations"]))


def _print_evaluations(rows: list[dict[str, Any]]) -> None:
    print_table(
        [
            *(Column(h, key=True) for h in ("eval", "ref", "commit", "state", "trust")),
            Column("build", key=True),
            Column("error"),
        ],
        [_eval_row(e) for e in rows],
    )


@click.command("jobs", context_settings=CONTEXT)
@click.argument("evaluation", type=click.IntRange(1))
@client_options
@json_option
@click.pass_context
def jobs(ctx: click.Context, evaluation: int, runner: ClientOptions, as_json: bool) -> None:
    """An evaluation's jobs and their states (exit 1 when it failed)."""
    data = _call(runner, "GET", f"/evaluations/{evaluation}")
    emit(as_json, data, lambda: _print_jobs(data))
    if data["state"] in ("failed", "eval_error"):
        ctx.exit(1)


def _print_jobs(data: dict[str, Any]) -> None:
    click.echo(
        f"evaluation {data['id']} of {data['project']} {data['ref']} "
        f"{_short(data['commit'])}: {data['state']}"
    )
    if data.get("error"):
        click.echo(data["error"])
    print_table(
        [Column("job", key=True), Column("state", key=True), Column("derivation / error")],
        [[j["attr"], j["state"], j["drv_path"] or j["error"] or ""] for j in data["jobs"]],
    )


COMMANDS = (projects, evals, jobs)
