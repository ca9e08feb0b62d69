"""SSH remote builders: ``bigtent ssh import`` (a Nix machines file as [[ssh_builders]]) and
``bigtent ssh check`` (connect to one and ask its Nix version)."""

from __future__ import annotations

from pathlib import Path

import click

from bigtent.cli.options import CONTEXT, config_option, json_option
from bigtent.cli.output import emit
from bigtent.config import load_runner_config
from bigtent.errors import UsageError


@click.group(context_settings=CONTEXT)
def ssh() -> None:
    """SSH remote builders ([[ssh_builders]] in runner.toml)."""


@ssh.command("import", context_settings=CONTEXT)
@click.argument("machines_file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def ssh_import(machines_file: Path, as_json: bool) -> None:
    """Convert a Nix machines file (e.g. /etc/nix/machines) into [[ssh_builders]] entries."""
    from bigtent.runner.venues.ssh import parse_machines_file, render_ssh_builders_toml

    try:
        text = machines_file.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {machines_file}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{machines_file} is not a text file") from exc
    builders = parse_machines_file(text)

    def human() -> None:
        click.echo(render_ssh_builders_toml(builders), nl=False)
        unpinned = [b.name for b in builders if b.host_key is None]
        if unpinned:
            click.echo(
                f"# No host key for {', '.join(unpinned)}: with ssh_require_host_key = true "
                "(the default) the runner will not use them until host_key is set.",
                err=True,
            )

    emit(as_json, [b.model_dump() for b in builders], human)


@ssh.command("check", context_settings=CONTEXT)
@click.argument("name")
@config_option("runner.toml with the [[ssh_builders]] entry.", required=True)
@click.option(
    "--connect-timeout-secs",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="ssh ConnectTimeout.",
)
@json_option
def ssh_check(name: str, config_path: Path, connect_timeout_secs: int, as_json: bool) -> None:
    """Connect to SSH builder NAME (user@host[:port], its URI or host) and print its Nix version."""
    from bigtent.runner.venues.ssh import find_builder
    from bigtent.runner.venues.sshcheck import check_ssh_builder

    cfg = load_runner_config(config_path)
    builder = find_builder(cfg.ssh_builders, name)
    result = check_ssh_builder(
        builder,
        require_host_key=cfg.ssh_require_host_key,
        connect_timeout_secs=connect_timeout_secs,
    )
    disabled = "" if builder.enabled else " (disabled in the config)"
    emit(
        as_json,
        {"name": result.name, "nix_version": result.nix_version},
        f"{result.name}: {result.nix_version}{disabled}",
    )


COMMANDS = (ssh,)
