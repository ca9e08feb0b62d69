"""Credentials: ``bigtent keys generate`` (a cache signing key) and ``bigtent token
create|list|revoke`` (bearer tokens, printed for runner.toml or stored in the runner)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from bigtent import humanize
from bigtent.cli.options import CONTEXT, ClientOptions, client_options, json_option
from bigtent.cli.output import emit
from bigtent.config import Role
from bigtent.errors import BigtentError, UsageError

if TYPE_CHECKING:
    from bigtent.apimodels import CreatedToken, TokenInfo


@click.group(context_settings=CONTEXT)
def keys() -> None:
    """Binary cache signing keys."""


def _write_new(path: Path, text: str, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as exc:
        raise UsageError(f"{path} already exists; use --force to overwrite it") from exc
    except OSError as exc:
        raise BigtentError(f"cannot write {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(mode)


@keys.command("generate", context_settings=CONTEXT)
@click.argument("name")
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(),
    show_default=True,
    help="Where to write NAME.sk and NAME.pk.",
)
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def keys_generate(name: str, out_dir: Path, force: bool) -> None:
    """Generate a cache signing key NAME (nix-store --generate-binary-cache-key format).

    Writes NAME.sk (mode 0600) and NAME.pk, and prints the public key for
    trusted-public-keys.
    """
    from bigtent.nix.keys import generate_key

    try:
        key = generate_key(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if "/" in name:
        raise UsageError(f"key name must not contain '/' (got {name!r})")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BigtentError(f"cannot create {out_dir}: {exc.strerror}") from exc
    _write_new(out_dir / f"{name}.sk", key.to_text() + "\n", 0o600, force)
    _write_new(out_dir / f"{name}.pk", key.public_key().to_text() + "\n", 0o644, force)
    click.echo(key.public_key().to_text())


@click.group(context_settings=CONTEXT)
def token() -> None:
    """Bearer tokens for agents, clients and admins."""


@token.command("create", context_settings=CONTEXT)
@click.option(
    "--role", required=True, type=click.Choice([r.value for r in Role]), help="What it may do."
)
@click.option("--name", help="Token name [default: ROLE-<random>].")
@click.option("--trusted", is_flag=True, help="Builds of this client token may count as trusted.")
@click.option(
    "--runner",
    "runner_url",
    metavar="URL",
    help="Store the token in this runner's database (admin token) instead of printing a "
    "runner.toml snippet.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --runner: file holding an admin token; without it the token is taken from "
    "BIGTENT_TOKEN (the token itself).",
)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="BIGTENT_CA_FILE",
    help="With --runner: CA certificate of an https runner [env: BIGTENT_CA_FILE].",
)
@json_option
def token_create(
    role: str,
    name: str | None,
    trusted: bool,
    runner_url: str | None,
    token_file: Path | None,
    ca_file: Path | None,
    as_json: bool,
) -> None:
    """Create a token; it is printed once, the runner stores only its digest.

    Without --runner it prints a [[auth.tokens]] entry for runner.toml; with --runner the
    runner stores it and it works at once (`bigtent token revoke` ends it).
    """
    if runner_url is not None:
        runner = ClientOptions(runner_url, token_file, ca_file)
        created = runner.call(lambda c: c.create_token(role, name=name, trusted=trusted))
        emit(as_json, created, lambda: _print_created(created))
        return
    if token_file is not None:
        raise UsageError("--token-file needs --runner")

    import secrets

    from bigtent.runner.auth.tokens import generate_token, token_digest

    name = name or f"{role}-{secrets.token_hex(3)}"
    value = generate_token()
    digest = token_digest(value)
    emit(
        as_json,
        {"name": name, "role": role, "trusted": trusted, "token": value, "sha256": digest},
        lambda: _print_snippet(name, role, trusted, value, digest),
    )


def _print_created(created: CreatedToken) -> None:
    click.echo(created.token)
    click.echo(
        f"\n# This token is shown only once. The runner stored it as {created.name!r} "
        f"(role {created.role}{', trusted' if created.trusted else ''}).",
        err=True,
    )


def _print_snippet(name: str, role: str, trusted: bool, value: str, digest: str) -> None:
    """The new token on stdout; on stderr, the ``[[auth.tokens]]`` entry for runner.toml."""
    click.echo(value)
    click.echo(
        "\n# This token is shown only once. Add to runner.toml:\n"
        "[[auth.tokens]]\n"
        f"name = {json.dumps(name)}\n"
        f"role = {json.dumps(role)}\n"
        f'sha256 = "{digest}"' + ("\ntrusted = true" if trusted else ""),
        err=True,
    )


@token.command("list", context_settings=CONTEXT)
@client_options
@json_option
def token_list(runner: ClientOptions, as_json: bool) -> None:
    """List the tokens stored in the runner's database, revoked ones too (admin token).

    Tokens in runner.toml are not listed.
    """
    rows = runner.call(lambda c: c.fetch_tokens())
    emit(as_json, rows, lambda: _print_tokens(rows))


def _print_tokens(rows: list[TokenInfo]) -> None:
    from bigtent.client.tables import Column, now_utc, print_table

    now = now_utc()
    columns = [Column("name", key=True)] + [
        Column(c, key=c in ("created", "revoked"))
        for c in ("role", "trusted", "created by", "created", "revoked")
    ]
    print_table(
        columns,
        [
            [
                t.name,
                t.role,
                "yes" if t.trusted else "no",
                t.created_by or "-",
                humanize.relative_iso(t.created_at, now),
                humanize.relative_iso(t.revoked_at, now),
            ]
            for t in rows
        ],
    )


@token.command("revoke", context_settings=CONTEXT)
@click.argument("name")
@client_options
@json_option
def token_revoke(name: str, runner: ClientOptions, as_json: bool) -> None:
    """Revoke the stored token NAME: it stops working at once (admin token)."""
    t = runner.call(lambda c: c.revoke_token(name))
    emit(as_json, t, f"revoked {t.name} (role {t.role}) at {t.revoked_at}")


COMMANDS = (keys, token)
