"""The pieces every command shares: ``emit`` (JSON for ``--json``, else text for people) and
``client_options`` (three options, one ``ClientOptions`` argument)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from bigtent.cli.options import ClientOptions, client_options, json_option
from bigtent.cli.output import emit, json_value


class _Thing(BaseModel):
    name: str
    path: Path


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (_Thing(name="a", path=Path("/x")), {"name": "a", "path": "/x"}),
        ([_Thing(name="a", path=Path("/x"))], [{"name": "a", "path": "/x"}]),
        ((1, "two"), [1, "two"]),
        ({"drained": "build-01"}, {"drained": "build-01"}),
        (None, None),
    ],
)
def test_json_value(value: Any, expected: Any) -> None:
    assert json_value(value) == expected


def test_emit_prints_json_or_the_human_form(capsys: pytest.CaptureFixture[str]) -> None:
    printed: list[str] = []
    emit(True, _Thing(name="a", path=Path("/x")), lambda: printed.append("human"))
    assert json.loads(capsys.readouterr().out) == {"name": "a", "path": "/x"}
    assert printed == []  # --json: the human form is not printed at all
    emit(False, {"x": 1}, lambda: printed.append("human"))
    assert printed == ["human"] and capsys.readouterr().out == ""
    emit(False, {"x": 1}, "one line")
    assert capsys.readouterr().out == "one line\n"


def test_client_options_become_one_argument(tmp_path: Path) -> None:
    got: list[tuple[ClientOptions, bool]] = []

    @click.command()
    @client_options
    @json_option
    def command(runner: ClientOptions, as_json: bool) -> None:
        got.append((runner, as_json))

    ca = tmp_path / "ca.pem"
    args = ["--runner", "http://a:1", "--runner", "http://b:2,http://c:3", "--ca-file", str(ca)]
    result = CliRunner().invoke(command, [*args, "--json"], env={"BIGTENT_URL": ""})
    assert result.exit_code == 0, result.output
    assert got == [(ClientOptions("http://a:1,http://b:2,http://c:3", None, ca), True)]
    result = CliRunner().invoke(command, [], env={"BIGTENT_URL": "", "BIGTENT_CA_FILE": ""})
    assert result.exit_code == 0, result.output
    assert got[-1] == (ClientOptions("http://127.0.0.1:8080", None, None), False)
