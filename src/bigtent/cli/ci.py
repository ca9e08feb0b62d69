"""CLI commands of Nix CI (docs/ci.md): ``bigtent projects``, ``bigtent evals``,
``bigtent jobs``. Registered on the ``bigtent`` group by ``cli.py``."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from bigtent.client.tables import Column, print_table
from bigtent.errors import UsageError

_CONTEXT = {"help_option_names": ["-h", "--help"]}


def _cli() -> Any:
    from bigtent import cli

    return cli


Runner = tuple[str, Path | None, Path | None]
"""The client options of a command: runner URL, token file, CA file."""


def _call(runner: Runner, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    result: dict[str, Any] = _cli()._call(*runner, lambda c: c.ci_json(method, path, **kwargs))
    return result


def _q(name: str) -> str:
    return quote(name, safe="")


def _client_options(f: Any) -> Any:
    return _cli()._client_options(f)


def _json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


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


def register(group: click.Group) -> None:
    """Add the CI commands to the ``bigtent`` group."""
    client_options = _client_options

    @group.group("projects", context_settings=_CONTEXT, invoke_without_command=True)
    @client_options
    @_json_option
    @click.pass_context
    def projects(
        ctx: click.Context,
        runner_url: str,
        token_file: Path | None,
        ca_file: Path | None,
        as_json: bool,
    ) -> None:
        """List the CI projects; add, remove, show and evaluate manage them."""
        if ctx.invoked_subcommand is not None:
            return
        args = (runner_url, token_file, ca_file)
        data = _call(args, "GET", "/projects")
        if as_json:
            _echo_json(data["projects"])
            return
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
                for p in data["projects"]
            ],
        )

    @projects.command("show", context_settings=_CONTEXT)
    @click.argument("name")
    @client_options
    @_json_option
    def projects_show(
        name: str, runner_url: str, token_file: Path | None, ca_file: Path | None, as_json: bool
    ) -> None:
        """A project, its branches and pull requests, and each one's latest evaluation."""
        args = (runner_url, token_file, ca_file)
        data = _call(args, "GET", f"/projects/{_q(name)}")
        if as_json:
            _echo_json(data)
            return
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
        print_table(
            [Column(h, key=True) for h in ("ref", "evals", "latest", "commit", "state")], rows
        )

    @projects.command("add", context_settings=_CONTEXT)
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
    @_json_option
    def projects_add(
        name: str,
        url: str,
        branches: tuple[str, ...],
        nix_file: str | None,
        attr: str,
        from_toml: Path | None,
        runner_url: str,
        token_file: Path | None,
        ca_file: Path | None,
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
        args = (runner_url, token_file, ca_file)
        data = _call(args, "POST", "/projects", json_body=body)
        if as_json:
            _echo_json(data)
        else:
            click.echo(f"added project {data['name']}")

    @projects.command("remove", context_settings=_CONTEXT)
    @click.argument("name")
    @client_options
    @_json_option
    def projects_remove(
        name: str, runner_url: str, token_file: Path | None, ca_file: Path | None, as_json: bool
    ) -> None:
        """Remove a project added through the API (admin token)."""
        args = (runner_url, token_file, ca_file)
        data = _call(args, "DELETE", f"/projects/{_q(name)}")
        if as_json:
            _echo_json(data)
        else:
            click.echo(f"removed project {name}")

    @projects.command("evaluate", context_settings=_CONTEXT)
    @click.argument("name")
    @click.option("--branch", help="The branch (default: the first built branch).")
    @client_options
    @_json_option
    def projects_evaluate(
        name: str,
        branch: str | None,
        runner_url: str,
        token_file: Path | None,
        ca_file: Path | None,
        as_json: bool,
    ) -> None:
        """Evaluate a branch's current commit now (admin token)."""
        args = (runner_url, token_file, ca_file)
        params = {"branch": branch} if branch else {}
        data = _call(args, "POST", f"/projects/{_q(name)}/evaluate", params=params)
        if as_json:
            _echo_json(data)
        elif data["evaluation"] is None:
            click.echo("not evaluated (the branch is not built)")
        else:
            click.echo(f"evaluation {data['evaluation']}")

    @group.command("evals", context_settings=_CONTEXT)
    @click.argument("project")
    @click.option("--ref", help="Only this ref (e.g. refs/heads/main, refs/pull/3/head).")
    @click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
    @client_options
    @_json_option
    def evals(
        project: str,
        ref: str | None,
        limit: int,
        runner_url: str,
        token_file: Path | None,
        ca_file: Path | None,
        as_json: bool,
    ) -> None:
        """A project's evaluations, newest first."""
        args = (runner_url, token_file, ca_file)
        params: dict[str, Any] = {"limit": limit}
        if ref:
            params["ref"] = ref
        data = _call(args, "GET", f"/projects/{_q(project)}/evaluations", params=params)
        if as_json:
            _echo_json(data["evaluations"])
            return
        print_table(
            [
                *(Column(h, key=True) for h in ("eval", "ref", "commit", "state", "trust")),
                Column("build", key=True),
                Column("error"),
            ],
            [_eval_row(e) for e in data["evaluations"]],
        )

    @group.command("jobs", context_settings=_CONTEXT)
    @click.argument("evaluation", type=click.IntRange(1))
    @client_options
    @_json_option
    def jobs(
        evaluation: int,
        runner_url: str,
        token_file: Path | None,
        ca_file: Path | None,
        as_json: bool,
    ) -> None:
        """An evaluation's jobs and their states (exit 1 when it failed)."""
        args = (runner_url, token_file, ca_file)
        data = _call(args, "GET", f"/evaluations/{evaluation}")
        if as_json:
            _echo_json(data)
        else:
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
        if data["state"] in ("failed", "eval_error"):
            raise SystemExit(1)
