"""The build hook's pure parts: Nix's wire format, the answers, exit statuses, options."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from bigtent.apimodels import Build, BuildRoot, FailedStep
from bigtent.client.hookcommon import HookConfig, LogSink, OnUnreachable
from bigtent.client.hookentry import (
    Reply,
    TryRequest,
    WireReader,
    decide,
    encode_request,
    encode_settings,
    encode_try,
    escape_line,
    farm_systems,
    fast_hand_over,
    json_str,
    local_store_uri,
    nix_message,
    put_strs,
    quick_options,
    quick_socket,
    read_settings,
    read_try,
    relay,
    reply_line,
    unescape_line,
)
from bigtent.client.hookfarm import failure_exit_code, wanted_paths
from bigtent.client.hookhandover import helper_argv, helper_socket, via_helper
from bigtent.client.nixhelper import parse_request
from bigtent.client.nixhook import parse_args, run_hook
from bigtent.states import BuildState

DRV = "/nix/store/czqhcspln0q6jcivma6n3kwn2zbyccsn-a.drv"
LINUX = frozenset({"x86_64-linux"})


def wire(data: bytes) -> WireReader:
    return WireReader(io.BytesIO(data))


def test_settings_and_try_round_trip_nix_wire_format() -> None:
    settings = {"store": "local?root=/tmp/x", "system": "x86_64-linux", "empty": ""}
    request = TryRequest(True, "x86_64-linux", DRV, frozenset({"kvm", "big-parallel"}))
    w = wire(encode_settings(settings) + encode_try(request))
    assert read_settings(w) == settings
    assert read_try(w) == request
    assert read_try(w) is None  # end of input: Nix has no more


def test_strings_are_padded_to_eight_bytes() -> None:
    data = put_strs(["abc", "12345678"])
    assert len(data) == 8 + (8 + 8) + (8 + 8)
    assert wire(data).read_strs() == ["abc", "12345678"]


def test_truncated_input_is_an_end_not_a_crash() -> None:
    full = encode_try(TryRequest(False, "x86_64-linux", DRV, frozenset()))
    with pytest.raises(EOFError):
        read_try(wire(full[:-3]))


def test_replies_are_the_lines_nix_expects() -> None:
    assert reply_line(Reply.ACCEPT) == b"# accept\nbigtent\n"
    assert reply_line(Reply.DECLINE) == b"# decline\n"
    assert reply_line(Reply.POSTPONE) == b"# postpone\n"


@pytest.mark.parametrize(
    ("system", "runner_ok", "reply"),
    [
        ("x86_64-linux", None, Reply.ACCEPT),
        ("x86_64-linux", True, Reply.ACCEPT),
        ("x86_64-linux", False, Reply.DECLINE),  # on-unreachable = local
        ("aarch64-linux", None, Reply.DECLINE),  # not a system the farm is asked for
        ("builtin", None, Reply.DECLINE),  # Nix's own fetchurl stays local
    ],
)
def test_decide(system: str, runner_ok: bool | None, reply: str) -> None:
    request = TryRequest(False, system, DRV, frozenset())
    assert decide(request, LINUX, runner_ok=runner_ok) == reply


def test_farm_systems_default_to_what_the_local_nix_builds() -> None:
    settings = {"system": "x86_64-linux", "extra-platforms": "i686-linux  "}
    assert farm_systems(frozenset(), settings) == {"x86_64-linux", "i686-linux"}
    assert farm_systems(frozenset({"aarch64-linux"}), settings) == {"aarch64-linux"}


@pytest.mark.parametrize(
    ("argv", "systems", "local"),
    [
        ([], set(), False),
        (["--system", "a-linux", "--system=b-linux", "3"], {"a-linux", "b-linux"}, False),
        (["--on-unreachable", "local", "--runner", "http://r"], set(), True),
        (["--on-unreachable=fail"], set(), False),
    ],
)
def test_quick_options_read_what_the_answer_needs(
    argv: list[str], systems: set[str], local: bool
) -> None:
    assert quick_options(argv) == (frozenset(systems), local)


def test_local_store_uri() -> None:
    assert local_store_uri({"store": "local?root=/tmp/c"}) == "local?root=/tmp/c"
    assert local_store_uri({"store": "auto"}) == ""
    assert local_store_uri({}) == ""


def build(*failed: tuple[str, str], roots: dict[str, str] | None = None) -> Build:
    return Build(
        id=7,
        state=BuildState.FAILED if failed else BuildState.SUCCEEDED,
        roots=[BuildRoot(drv_path=DRV, outputs=roots or {})],
        failed_steps=[
            FailedStep(id=i, drv_path=DRV, state=state, outcome=outcome)
            for i, (state, outcome) in enumerate(failed)
        ],
    )


def test_failure_exit_codes_mean_what_nix_expects() -> None:
    assert failure_exit_code(build(("failed", "build_failure"))) == 100
    assert failure_exit_code(build(("failed", "log_limit"))) == 100
    assert failure_exit_code(build(("failed", "timed_out"), ("failed", "build_failure"))) == 101
    assert failure_exit_code(build(("failed", "unsupported"))) == 1
    assert failure_exit_code(build(("cancelled", ""))) == 1


def test_wanted_paths() -> None:
    b = build(roots={"out": "/nix/store/a-x", "dev": "/nix/store/b-x-dev"})
    assert wanted_paths(b, ["out"]) == ["/nix/store/a-x"]
    assert wanted_paths(b, []) == ["/nix/store/b-x-dev", "/nix/store/a-x"]


def test_parse_args_reads_the_token_file_and_keeps_it_off_the_helper_command_line(
    tmp_path: Path,
) -> None:
    token = tmp_path / "token"
    token.write_text("bt_secret\n")
    config = parse_args(
        [
            "--runner",
            "http://r:1",
            "--token-file",
            str(token),
            "--system",
            "x86_64-linux",
            "--public-key",
            "farm-1:abc=",
            "3",
        ],
        {},
    )
    assert config.token == "bt_secret"
    assert config.systems == {"x86_64-linux"}
    assert config.public_keys == ("farm-1:abc=",)
    assert config.helper
    argv = helper_argv(config)
    assert "bt_secret" not in " ".join(argv)
    assert argv[-1] == "--socket"
    assert parse_args([*argv, "/tmp/s.sock"], {"BIGTENT_TOKEN": "bt_secret"}) == config._replace(
        socket="/tmp/s.sock"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--oidc", "github"], "--audience"),
        (["--token-file", "/nonexistent/token"], "cannot read token file"),
        (["--on-unreachable", "sometimes"], "bad arguments"),
        (["--poll-interval", "0"], "positive"),
    ],
)
def test_parse_args_mistakes_are_messages(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_args(argv, {})


def test_oidc_needs_no_token() -> None:
    config = parse_args(["--oidc", "github", "--audience", "bigtent"], {"BIGTENT_TOKEN": "x"})
    assert config.token is None and config.oidc_audience == "bigtent"


def test_helper_socket_is_one_per_runner_and_credential() -> None:
    a = HookConfig(runner_url="http://r", token="t1")
    env = {"XDG_RUNTIME_DIR": "/run/user/5"}
    assert helper_socket(a, 5, env).startswith("/run/user/5/helper-")
    assert helper_socket(a, 5, {}).startswith("/tmp/bigtent-nix-hook-5/helper-")
    assert helper_socket(a, 0, {}).startswith("/run/bigtent-nix-hook/helper-")  # not /tmp
    assert helper_socket(a, 5, env) == helper_socket(a, 5, env)
    assert helper_socket(a, 5, env) != helper_socket(a._replace(token="t2"), 5, env)
    assert helper_socket(a._replace(socket="/x.sock"), 5, env) == "/x.sock"


def test_helper_requests_are_checked() -> None:
    raw = json.dumps({"drv": DRV, "wanted": ["out"], "store": ""}).encode()
    assert parse_request(raw) == (DRV, ["out"], "")
    for bad in ({"drv": "/etc/passwd", "wanted": [], "store": ""}, {"drv": DRV}, [1]):
        with pytest.raises(ValueError):
            parse_request(json.dumps(bad).encode())


def test_hook_declines_what_the_farm_is_not_asked_for_and_ends_with_nix() -> None:
    """A whole hook conversation without a runner: two declines, then Nix closes stdin."""
    stdin = io.BytesIO(
        encode_settings({"system": "x86_64-linux"})
        + encode_try(TryRequest(True, "aarch64-linux", DRV, frozenset()))
        + encode_try(TryRequest(True, "builtin", DRV, frozenset()))
    )
    stderr, log = io.BytesIO(), io.BytesIO()
    config = HookConfig(runner_url="http://127.0.0.1:9", on_unreachable=OnUnreachable.FAIL)
    assert run_hook(config, stdin, stderr, log) == 0
    assert stderr.getvalue() == b"# decline\n# decline\n"


def test_log_sink_errors_go_to_the_log_and_to_nix_as_json() -> None:
    log, messages = io.BytesIO(), io.BytesIO()
    LogSink(log, messages).error("runner said no")
    assert log.getvalue() == b"bigtent: runner said no\n"
    line = messages.getvalue()
    assert line.startswith(b"@nix ")
    assert json.loads(line[5:]) == {"action": "msg", "level": 0, "msg": "bigtent: runner said no"}


class _Errors:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def line(self, text: str) -> None:
        pass

    def error(self, text: str) -> None:
        self.errors.append(text)


@pytest.mark.parametrize("planted", ["open to others", "another user's"])
def test_hook_does_not_talk_to_a_helper_in_a_directory_another_user_controls(
    planted: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local user pre-creates the helper's directory (``/tmp/bigtent-nix-hook-0`` under the
    daemon) and serves a fake helper there: the hook must refuse before connecting."""
    if planted == "another user's" and os.getuid() != 0:
        pytest.skip("needs root to give the directory away")
    config = HookConfig(runner_url="http://r", token="secret-token")
    short = Path(tempfile.mkdtemp(prefix="bt-", dir="/tmp"))  # a socket path is short
    planted_dir = short / "planted"
    planted_dir.mkdir()
    if planted == "open to others":
        planted_dir.chmod(0o777)
    else:
        planted_dir.chmod(0o700)
        os.chown(planted_dir, 65534, 65534)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(planted_dir))
    path = helper_socket(config, os.getuid(), os.environ)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(10)
    talked: list[bytes] = []

    def fake_helper() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            talked.append(conn.recv(4096))

    thread = threading.Thread(target=fake_helper, daemon=True)
    thread.start()
    sink = _Errors()
    try:
        assert via_helper(config, "", DRV, ["out"], sink) == 1
    finally:
        server.close()
        thread.join(timeout=10)
        shutil.rmtree(short)
    assert talked == []
    assert sink.errors and "closed to others" in sink.errors[0]


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--runner", "http://r:1", "--token-file", "TOKEN", "--public-key", "k:a=", "3"], {}),
        (["--runner=http://r:1", "--token-file=TOKEN", "--system", "x86_64-linux"], {}),
        (["--ca-file", "/ca.pem", "--helper-idle", "5"], {"BIGTENT_TOKEN": "bt_env"}),
        ([], {"BIGTENT_URL": "http://u:2", "BIGTENT_TOKEN": "bt_env", "XDG_RUNTIME_DIR": "/r/"}),
        (["--token-file", "TOKEN", "--socket", "/tmp/h.sock", "0"], {}),
    ],
)
def test_the_quick_socket_is_the_helpers(
    tmp_path: Path, argv: list[str], env: dict[str, str]
) -> None:
    """The hook's hand-over without argparse finds the socket the full path would use."""
    token = tmp_path / "token"
    token.write_text("bt_secret\n")
    argv = [a.replace("TOKEN", str(token)) for a in argv]
    quick = quick_socket(argv, env, 7)
    assert quick is not None
    assert quick == helper_socket(parse_args(argv, env), 7, env)


@pytest.mark.parametrize(
    "argv",
    [
        ["--no-helper"],
        ["--oidc", "github", "--audience", "bigtent"],
        ["--token-file", "/nonexistent/token"],
        ["--surprise", "x"],
        ["--runner"],
    ],
)
def test_the_quick_socket_leaves_the_unusual_to_the_full_path(argv: list[str]) -> None:
    assert quick_socket(argv, {"BIGTENT_TOKEN": "t"}, 7) is None


@pytest.mark.parametrize("text", ["", "plain", 'q"uote\\back', "tab\tnl\nnul\0", "ünï ☃"])
def test_hand_written_json_is_json(text: str) -> None:
    assert json.loads(json_str(text)) == text
    assert json.loads(nix_message(text).removeprefix(b"@nix "))["msg"] == text
    assert unescape_line(escape_line(text)) == text
    assert "\n" not in escape_line(text)
    raw = encode_request(DRV, ["out", text], text)
    assert parse_request(raw) == (DRV, ["out", text], text)


class ChunkedConn:
    """A socket whose replies arrive in arbitrary pieces."""

    def __init__(self, replies: bytes, size: int) -> None:
        self.sent = b""
        self.pieces = [replies[i : i + size] for i in range(0, len(replies), size)]

    def sendall(self, data: bytes, /) -> None:
        self.sent += data

    def recv(self, n: int, /) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_relay_hands_on_the_helpers_replies(size: int) -> None:
    replies = "".join(
        f"{kind} {escape_line(text)}\n"
        for kind, text in [("log", "line one"), ("log", "two\nthree \\n"), ("error", "boom")]
    )
    conn = ChunkedConn((replies + "exit 100\nlog after the end\n").encode(), size)
    logs: list[str] = []
    errors: list[str] = []
    assert relay(conn, b"request\n", logs.append, errors.append) == 100
    assert conn.sent == b"request\n"
    assert logs == ["line one", "two\nthree \\n"]
    assert errors == ["boom"]
    # A helper that goes away before its exit line: None, the caller says so.
    assert relay(ChunkedConn(b"log half", size), b"r\n", logs.append, errors.append) is None


def test_the_quick_hand_over_does_not_talk_to_a_helper_in_a_directory_open_to_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path (no argparse, for a helper that already listens) checks the directory
    as the full path does: a helper planted in a directory others may enter gets nothing."""
    token = tmp_path / "token"
    token.write_text("bt_secret\n")
    argv = ["--runner", "http://r", "--token-file", str(token)]
    short = Path(tempfile.mkdtemp(prefix="bt-", dir="/tmp"))  # a socket path is short
    planted_dir = short / "planted"
    planted_dir.mkdir()
    planted_dir.chmod(0o777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(planted_dir))
    path = quick_socket(argv, os.environ, os.getuid())
    assert path is not None and path.startswith(str(planted_dir))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.setblocking(False)
    try:
        assert fast_hand_over(argv, {}, DRV, ["out"]) is None  # left to the full path
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
        planted_dir.chmod(0o700)  # the same directory closed: the fast path would connect
        assert quick_socket(argv, os.environ, os.getuid()) == path
    finally:
        server.close()
        shutil.rmtree(short)
