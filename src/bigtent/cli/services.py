"""The long-running programs: ``bigtent runner``, ``bigtent agent`` (its flags as config
overrides) and ``bigtent up`` (a runner and N agents on this machine)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from bigtent.cli.options import CONTEXT, config_option, run
from bigtent.config import OidcProvider, load_agent_config, load_runner_config, split_comma_list


@click.command(context_settings=CONTEXT)
@config_option("runner.toml (keys overridable by BIGTENT_<SECTION>__<KEY>).")
def runner(config_path: Path | None) -> None:
    """Run the runner: API, binary cache, scheduler and agent sessions."""
    cfg = load_runner_config(config_path)
    from bigtent.runner.http.app import serve

    run(serve(cfg))


@click.command(context_settings=CONTEXT)
@config_option("agent.toml; flags override it.")
@click.option("--runner-url", metavar="URL", help="http(s)://host:port of the runner.")
@click.option("--name", help="Agent name [default: host name].")
@click.option(
    "--system",
    "systems",
    multiple=True,
    help="System to build for (repeatable, or comma-separated).",
)
@click.option(
    "--supported-feature", "supported", multiple=True, help="Repeatable, or comma-separated."
)
@click.option(
    "--mandatory-feature", "mandatory", multiple=True, help="Repeatable, or comma-separated."
)
@click.option("--max-jobs", type=click.IntRange(min=1), help="Steps run at once.")
@click.option("--speed-factor", type=click.FloatRange(min=0, min_open=True))
@click.option("--store", metavar="URI", help='Nix store, e.g. "local?root=/var/lib/a1".')
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Agent token file [default: $BIGTENT_AGENT_TOKEN].",
)
@click.option("--sandbox-path", "sandbox_paths", multiple=True, help="Extra sandbox path.")
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path), help="Runner CA.")
@click.option(
    "--client-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    help="mTLS: this agent's certificate (PEM).",
)
@click.option(
    "--client-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="mTLS: its key [default: in the certificate file].",
)
@click.option(
    "--executor",
    type=click.Choice(["serve", "realise"]),
    help="serve: long-lived nix-store --serve per slot [default]; realise: one per step.",
)
@click.option(
    "--skip-probe",
    is_flag=True,
    help="Do not build the start-up probe before registering (agent.probe = false).",
)
@click.option(
    "--min-free-bytes",
    type=click.IntRange(min=0),
    help="Collect the store (Nix's GC) when its free disk falls below this [default: 0, never].",
)
@click.option(
    "--target-free-bytes",
    type=click.IntRange(min=0),
    help="Free disk a collection aims for [default: twice --min-free-bytes].",
)
@click.option("--ephemeral", is_flag=True, help="One session only (architecture §4).")
@click.option(
    "--untrusted", is_flag=True, help="An untrusted venue: take only untrusted builds' steps."
)
@click.option("--max-builds", type=click.IntRange(min=1), help="Ephemeral: builds, then exit.")
@click.option("--max-idle-secs", type=click.FloatRange(min=0, min_open=True))
@click.option("--max-lifetime-secs", type=click.FloatRange(min=0, min_open=True))
@click.option(
    "--oidc",
    type=click.Choice([p.value for p in OidcProvider]),
    help="Present the CI job's OIDC ID token (github: from the Actions environment); "
    "implies --ephemeral.",
)
@click.option("--audience", help="Audience to request the ID token for (with --oidc).")
@click.option(
    "--launch-id",
    metavar="ID",
    envvar="BIGTENT_LAUNCH_ID",
    help="Launch id to report at register [env: BIGTENT_LAUNCH_ID].",
)
@click.pass_context
def agent(
    ctx: click.Context,
    config_path: Path | None,
    runner_url: str | None,
    name: str | None,
    systems: tuple[str, ...],
    supported: tuple[str, ...],
    mandatory: tuple[str, ...],
    max_jobs: int | None,
    speed_factor: float | None,
    store: str | None,
    work_dir: Path | None,
    token_file: Path | None,
    sandbox_paths: tuple[str, ...],
    ca_file: Path | None,
    client_cert: Path | None,
    client_key: Path | None,
    executor: str | None,
    skip_probe: bool,
    min_free_bytes: int | None,
    target_free_bytes: int | None,
    ephemeral: bool,
    untrusted: bool,
    max_builds: int | None,
    max_idle_secs: float | None,
    max_lifetime_secs: float | None,
    oidc: str | None,
    audience: str | None,
    launch_id: str | None,
) -> None:
    """Run a build agent that dials in to the runner."""
    overrides = agent_overrides(
        runner_url=runner_url,
        name=name,
        systems=tuple(split_comma_list(systems)),
        supported_features=tuple(split_comma_list(supported)),
        mandatory_features=tuple(split_comma_list(mandatory)),
        max_jobs=max_jobs,
        speed_factor=speed_factor,
        store=store,
        work_dir=work_dir,
        token_file=token_file,
        sandbox_paths=sandbox_paths,
        ca_file=ca_file,
        client_cert_file=client_cert,
        client_key_file=client_key,
        executor=executor,
        min_free_bytes=min_free_bytes,
        target_free_bytes=target_free_bytes,
        ephemeral=ephemeral,
        untrusted=untrusted,
        max_builds=max_builds,
        max_idle_secs=max_idle_secs,
        max_lifetime_secs=max_lifetime_secs,
        oidc=oidc,
        audience=audience,
        launch_id=launch_id,
    )
    if skip_probe:
        overrides.setdefault("agent", {})["probe"] = False
    cfg = load_agent_config(config_path, **overrides)
    from bigtent.agent.credentials import load_credentials
    from bigtent.agent.main import run_agent

    credentials = load_credentials(cfg.agent, os.environ, token_file_flag=token_file)
    ctx.exit(run(run_agent(cfg, credentials)))


def agent_overrides(**flags: Any) -> dict[str, Any]:
    """Flags given on the command line as a config override (unset flags are left out)."""
    eph_keys = ("max_builds", "max_idle_secs", "max_lifetime_secs")
    section: dict[str, Any] = {}
    ephemeral: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None or value == () or value is False:
            continue
        if key == "ephemeral":
            continue
        if key in eph_keys:
            ephemeral[key] = value
        elif isinstance(value, tuple):
            section[key] = list(value)
        elif isinstance(value, Path):
            section[key] = str(value)
        else:
            section[key] = value
    if flags.get("ephemeral") or ephemeral:
        section["ephemeral"] = ephemeral
    return {"agent": section} if section else {}


@click.command(context_settings=CONTEXT)
@click.option("--agents", "n_agents", type=click.IntRange(min=0), default=2, show_default=True)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".bigtent"),
    show_default=True,
)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option(
    "--jobs", type=click.IntRange(min=1), default=2, show_default=True, help="Jobs per agent."
)
@click.option(
    "--host-tools",
    is_flag=True,
    help="Map the host's /bin, /usr, /lib, /lib64 into every agent's build sandbox.",
)
@click.pass_context
def up(
    ctx: click.Context, n_agents: int, state_dir: Path, port: int, jobs: int, host_tools: bool
) -> None:
    """Run a runner and N local agents on this machine (the embedded default)."""
    from bigtent.up import UpSettings, run_up

    settings = UpSettings(
        state_dir=state_dir.absolute(),
        agents=n_agents,
        port=port,
        jobs=jobs,
        host_tools=host_tools,
    )
    ctx.exit(run(run_up(settings, say=click.echo)))


COMMANDS = (runner, agent, up)
