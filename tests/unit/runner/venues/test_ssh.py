"""SSH builder values: URIs, known_hosts pins, NIX_SSHOPTS, machine lines, machines files."""

from __future__ import annotations

import base64
import ipaddress
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigtent.config import (
    RunnerConfig,
    SshBuilderSection,
    load_runner_config,
    ssh_builder_warnings,
)
from bigtent.config.sshuri import (
    KEY_TYPES,
    SshTarget,
    check_no_whitespace,
    normalize_host_key,
    parse_ssh_uri,
    store_settings,
)
from bigtent.errors import ConfigError
from bigtent.runner.venues.ssh import (
    builders_line,
    find_builder,
    known_hosts_line,
    nix_sshopts,
    parse_machines_file,
    render_ssh_builders_toml,
    ssh_argv,
)


def make_key(key_type: str = "ssh-ed25519", payload: bytes = b"\x01" * 32) -> str:
    """A syntactically real public key: the blob names its own type first, as ssh's do."""
    blob = struct.pack(">I", len(key_type)) + key_type.encode()
    blob += struct.pack(">I", len(payload)) + payload
    return f"{key_type} {base64.b64encode(blob).decode()}"


KEY = make_key()
KEY_B64 = KEY.split()[1]


# ---- URIs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "target"),
    [
        ("ssh://host", SshTarget(None, "host", None)),
        ("ssh://nix@builder1.example.org", SshTarget("nix", "builder1.example.org", None)),
        ("ssh://nix@10.0.0.1:2222", SshTarget("nix", "10.0.0.1", 2222)),
        ("ssh://root@[::1]:2222", SshTarget("root", "::1", 2222)),
        ("ssh://[fe80::1]", SshTarget(None, "fe80::1", None)),
        ("ssh://fe80::1", SshTarget(None, "fe80::1", None)),
        ("ssh://root@::1", SshTarget("root", "::1", None)),
        ("ssh://host?remote-store=/x", SshTarget(None, "host", None)),
        ("ssh://u@[::1]:22?remote-store=/x&a=b", SshTarget("u", "::1", 22)),
        ("ssh://a.b-c_d:65535", SshTarget(None, "a.b-c_d", 65535)),
    ],
)
def test_parse_ssh_uri(uri: str, target: SshTarget) -> None:
    assert parse_ssh_uri(uri) == target


@pytest.mark.parametrize(
    "uri",
    [
        "host",
        "ssh-ng://host",
        "http://host",
        "ssh://",
        "ssh://user@",
        "ssh://:22",
        "ssh://@host",
        "ssh://host:0",
        "ssh://host:65536",
        "ssh://host:x",
        "ssh://host:",
        "ssh://host/path",
        "ssh://-oProxyCommand=x",
        "ssh://-user@host",
        "ssh://us er@host",
        "ssh://user:pw@host",
        "ssh://[::1",
        "ssh://[::1]x",
        "ssh://[::1]:",
        "ssh://[host]",
        "ssh://[]",
        "ssh://[fe80::1%eth0]",
        "ssh://1:2:3",
        "ssh://h st",
        "ssh://host#frag",
    ],
)
def test_parse_ssh_uri_rejects(uri: str) -> None:
    with pytest.raises(ConfigError, match="SSH builder URI"):
        parse_ssh_uri(uri)


_hostnames = st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?", fullmatch=True)
_v6 = st.ip_addresses(v=6).map(str)
_users = st.none() | st.from_regex(r"[a-z_][a-z0-9_.-]{0,10}", fullmatch=True)
_ports = st.none() | st.integers(1, 65535)


@given(user=_users, host=_hostnames | _v6, port=_ports)
def test_uri_round_trip(user: str | None, host: str, port: int | None) -> None:
    shown = f"[{host}]" if ":" in host else host
    uri = "ssh://" + (f"{user}@" if user else "") + shown + (f":{port}" if port else "")
    target = parse_ssh_uri(uri + "?remote-store=/x")
    assert target == SshTarget(user, host, port)
    assert "[" not in target.host
    assert parse_ssh_uri("ssh://" + target.name()) == target


# ---- known_hosts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "pattern"),
    [
        ("ssh://host", "host"),
        ("ssh://u@host:22", "host"),
        ("ssh://u@host:2222", "[host]:2222"),
        ("ssh://root@[::1]:2222", "[::1]:2222"),
        ("ssh://[fe80::1]", "fe80::1"),
        ("ssh://[fe80::1]:22", "fe80::1"),
    ],
)
def test_known_hosts_line_bare_key(uri: str, pattern: str) -> None:
    assert known_hosts_line(parse_ssh_uri(uri), KEY + " root@builder") == f"{pattern} {KEY}"


@given(host=_hostnames | _v6, port=_ports)
def test_ipv6_is_bracketed_exactly_once(host: str, port: int | None) -> None:
    line = known_hosts_line(SshTarget("u", host, port), KEY)
    pattern = line.split()[0]
    assert pattern.count("[") == pattern.count("]") <= 1
    if port not in (None, 22):
        assert pattern == f"[{host}]:{port}"
    else:
        assert pattern == host
    if ":" in host and port in (None, 22):
        ipaddress.IPv6Address(pattern)


@pytest.mark.parametrize(
    "line",
    [
        f"builder1.example.org {KEY}",
        f"[10.0.0.1]:2222,builder1 {KEY} comment here",
        f"|1|c2FsdHNhbHRzYWx0c2FsdHNhbHQ=|aGFzaGhhc2hoYXNoaGFzaGhhc2g= {KEY}",
        f"builder1 {make_key('ssh-rsa', b'x' * 64)}",
    ],
)
def test_known_hosts_full_line_used_as_is(line: str) -> None:
    target = parse_ssh_uri("ssh://u@elsewhere:2222")
    assert known_hosts_line(target, f"  {line}\n") == line


@pytest.mark.parametrize("key_type", sorted(KEY_TYPES))
def test_every_key_type(key_type: str) -> None:
    key = make_key(key_type)
    assert normalize_host_key(key) == key
    assert known_hosts_line(SshTarget(None, "h", None), key) == f"h {key}"


@pytest.mark.parametrize(
    ("host_key", "match"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (f"# {KEY}", "comment"),
        (f"#host {KEY}", "comment"),
        (f"@cert-authority *.example.org {KEY}", "markers"),
        (f"@revoked host {KEY}", "markers"),
        ("host", "no known key type"),
        (f"a b {KEY}", "no known key type"),
        ("ssh-dss AAAAB3NzaC1kc3M=", "no known key type"),
        ("ssh-ed25519", "no base64"),
        ("host ssh-ed25519", "no base64"),
        ("ssh-ed25519 not!base64", "not valid base64"),
        ("ssh-ed25519 AAAA", "too short"),
        (f"ssh-rsa {KEY_B64}", "does not hold a ssh-rsa key"),
        (f"{KEY}\nevil {KEY}", "single line"),
    ],
)
def test_host_key_rejected(host_key: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        normalize_host_key(host_key)
    with pytest.raises(ConfigError):
        known_hosts_line(SshTarget(None, "h", None), host_key)


# ---- NIX_SSHOPTS -----------------------------------------------------------------------------


def test_nix_sshopts_fixed_order() -> None:
    opts = nix_sshopts(
        ssh_key="/etc/bigtent/ssh/id", known_hosts_file="/tmp/kh", port=2222, connect_timeout_secs=7
    )
    assert opts == (
        "-o StrictHostKeyChecking=yes -o UserKnownHostsFile=/tmp/kh "
        "-o GlobalKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o IdentityAgent=none "
        "-o BatchMode=yes -o ConnectTimeout=7 -i /etc/bigtent/ssh/id -p 2222"
    )


@pytest.mark.parametrize("port", [None, 22])
def test_nix_sshopts_no_key_default_port(port: int | None) -> None:
    opts = nix_sshopts(ssh_key=None, known_hosts_file="/k", port=port, connect_timeout_secs=5)
    assert "-i" not in opts.split() and "-p" not in opts.split()
    assert opts.endswith("ConnectTimeout=5")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ssh_key": "/my keys/id"}, "ssh_key must not contain whitespace"),
        ({"ssh_key": "/k\tx"}, "ssh_key must not contain whitespace"),
        ({"ssh_key": ""}, "ssh_key must not be empty"),
        ({"known_hosts_file": "/tmp/a b/kh"}, "known_hosts path must not contain whitespace"),
        ({"connect_timeout_secs": 0}, "at least 1"),
        ({"port": 70000}, "1-65535"),
    ],
)
def test_nix_sshopts_rejects(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "ssh_key": "/k",
        "known_hosts_file": "/kh",
        "port": None,
        "connect_timeout_secs": 5,
    }
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        nix_sshopts(**args)  # type: ignore[arg-type]


@given(value=st.text(min_size=1, max_size=20))
def test_check_no_whitespace(value: str) -> None:
    if any(c.isspace() for c in value):
        with pytest.raises(ConfigError, match="the path"):
            check_no_whitespace("the path", value)
    else:
        check_no_whitespace("the path", value)


@given(
    key=st.none() | st.from_regex(r"/[A-Za-z0-9._/-]{1,30}", fullmatch=True),
    port=_ports,
    timeout=st.integers(1, 3600),
)
def test_nix_sshopts_split_like_nix(key: str | None, port: int | None, timeout: int) -> None:
    opts = nix_sshopts(
        ssh_key=key, known_hosts_file="/t/kh", port=port, connect_timeout_secs=timeout
    )
    words = opts.split()
    assert words[:2] == ["-o", "StrictHostKeyChecking=yes"]
    assert ("-i" in words) == (key is not None)
    assert ("-p" in words) == (port not in (None, 22))
    assert all(w == "-o" or w in ("-i", "-p") or i % 2 for i, w in enumerate(words))


def test_ssh_argv() -> None:
    target = parse_ssh_uri("ssh://root@[::1]:2222")
    opts = nix_sshopts(ssh_key=None, known_hosts_file="/kh", port=2222, connect_timeout_secs=3)
    argv = ssh_argv(target, opts, ["nix-store", "--version"])
    assert argv[0] == "ssh" and argv[-4:] == ["--", "root@::1", "nix-store", "--version"]
    assert argv[-6:-4] == ["-p", "2222"]


# ---- machine lines ---------------------------------------------------------------------------


def test_builders_line() -> None:
    line = builders_line(
        parse_ssh_uri("ssh://nix@builder1:2222?remote-store=/ignored"),
        systems=["x86_64-linux", "i686-linux"],
        ssh_key="/etc/k",
        max_jobs=8,
        speed_factor=2.0,
        supported_features=["kvm", "big-parallel"],
        mandatory_features=[],
    )
    assert line == "ssh://nix@builder1 x86_64-linux,i686-linux /etc/k 8 2 kvm,big-parallel - -"


def test_builders_line_remote_store_and_ipv6() -> None:
    line = builders_line(
        parse_ssh_uri("ssh://root@[::1]:2222"),
        systems=["x86_64-linux"],
        ssh_key=None,
        max_jobs=1,
        speed_factor=1.5,
        supported_features=[],
        mandatory_features=["benchmark"],
        remote_store="/tmp/storeR",
        remote_program="/tmp/wrap",
    )
    assert line == (
        "ssh://root@::1?remote-store=/tmp/storeR&remote-program=/tmp/wrap "
        "x86_64-linux - 1 1.5 - benchmark -"
    )
    assert len(line.split()) == 8


@pytest.mark.parametrize(
    ("uri", "remote_store", "remote_program"),
    [
        ("ssh://host", None, None),
        ("ssh://host?remote-store=/srv/root", "/srv/root", None),
        ("ssh://u@[::1]:22?remote-program=/opt/nix-store&remote-store=local%3Froot%3D/r",
         "local?root=/r", "/opt/nix-store"),
    ],
)  # fmt: skip
def test_store_settings(uri: str, remote_store: str | None, remote_program: str | None) -> None:
    settings = store_settings(uri)
    assert (settings.remote_store, settings.remote_program) == (remote_store, remote_program)


def test_store_settings_round_trip_through_the_machine_line() -> None:
    uri = "ssh://root@10.0.0.1:2222?remote-store=local%3Froot%3D/r"
    settings = store_settings(uri)
    line = builders_line(
        parse_ssh_uri(uri),
        systems=["x86_64-linux"],
        ssh_key=None,
        max_jobs=1,
        speed_factor=1,
        supported_features=[],
        mandatory_features=[],
        remote_store=settings.remote_store,
        remote_program=settings.remote_program,
    )
    assert line.split()[0] == "ssh://root@10.0.0.1?remote-store=local%3Froot%3D/r"


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("ssh://h?compress=true", "unknown setting 'compress'"),
        ("ssh://h?remote-store=/a&remote-store=/b", "sets 'remote-store' twice"),
        ("ssh://h?remote-store=", "must not be empty"),
        ("ssh://h?remote-store=/a%20b", "whitespace"),
        ("ssh://h?remote-store", "malformed query"),
    ],
)
def test_store_settings_refuses(uri: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        store_settings(uri)
    # The config refuses the same URI with the same reason.
    with pytest.raises(ConfigError, match=match):
        load_runner_config(None, ssh_builders=[{"uri": uri, "systems": ["x"]}])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"systems": []}, "at least one system"),
        ({"systems": ["a,b"]}, "systems entries"),
        ({"supported_features": ["big parallel"]}, "supported_features entries"),
        ({"mandatory_features": [""]}, "mandatory_features entries"),
        ({"ssh_key": "/a b"}, "ssh_key"),
        ({"max_jobs": 0}, "max_jobs"),
        ({"speed_factor": 0.0}, "speed_factor"),
        ({"remote_store": "/tmp/a b"}, "remote_store"),
    ],
)
def test_builders_line_rejects(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "systems": ["x86_64-linux"],
        "ssh_key": None,
        "max_jobs": 1,
        "speed_factor": 1.0,
        "supported_features": [],
        "mandatory_features": [],
    }
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        builders_line(SshTarget(None, "h", None), **args)  # type: ignore[arg-type]


# ---- machines files --------------------------------------------------------------------------


def test_parse_machines_file() -> None:
    host_key_b64 = base64.b64encode(f"{KEY} root@builder1\n".encode()).decode()
    text = (
        "# Nix machines file\n"
        "\n"
        "ssh://nix@builder1:2222 x86_64-linux,i686-linux /etc/k 8 2 kvm,big-parallel - "
        f"{host_key_b64}\n"
        "builder2 aarch64-linux  # trailing comment\n"
        "ssh://[::1] x86_64-linux - - - - benchmark -; ssh://b3 riscv64-linux\n"
    )
    b1, b2, b3, b4 = parse_machines_file(text)
    assert b1 == SshBuilderSection(
        uri="ssh://nix@builder1:2222",
        systems=["x86_64-linux", "i686-linux"],
        ssh_key="/etc/k",
        max_jobs=8,
        speed_factor=2.0,
        supported_features=["kvm", "big-parallel"],
        mandatory_features=[],
        host_key=KEY,
    )
    assert b2 == SshBuilderSection(uri="ssh://builder2", systems=["aarch64-linux"])
    assert (b3.uri, b3.mandatory_features, b3.host_key, b3.ssh_key) == (
        "ssh://[::1]",
        ["benchmark"],
        None,
        None,
    )
    assert (b3.max_jobs, b3.speed_factor) == (1, 1.0)
    assert b4.uri == "ssh://b3"


def test_machines_file_full_known_hosts_line_as_host_key() -> None:
    line = f"[builder1]:2222 {KEY}"
    b64 = base64.b64encode(line.encode()).decode()
    (b,) = parse_machines_file(f"ssh://builder1:2222 x86_64-linux - 1 1 - - {b64}")
    assert b.host_key == line


def test_machines_file_empty() -> None:
    assert parse_machines_file("# nothing\n\n   \n") == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("h x86_64-linux - 1 1 - - - extra", "line 1: 9 fields"),
        ("# c\nssh-ng://h x86_64-linux", "line 2: .*ssh-ng://"),
        ("h", "line 1: no systems"),
        ("h -", "line 1: no systems"),
        ("h x86_64-linux - many", "line 1: max jobs"),
        ("h x86_64-linux - 0", "line 1: max_jobs"),
        ("h x86_64-linux - 1 fast", "line 1: speed factor"),
        ("h x86_64-linux - 1 -2", "line 1: speed_factor"),
        ("h x86_64-linux - 1 1 - - !!!", "line 1: the host key .* not base64"),
        (
            "h x86_64-linux - 1 1 - - " + base64.b64encode(b"# just a comment").decode(),
            "line 1: the host key .*comment",
        ),
        ("\n\nh x86_64-linux '/my key'", "line 3: "),
    ],
)
def test_machines_file_errors_name_the_line(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_machines_file(text)


def test_render_toml_round_trips() -> None:
    import tomllib

    builders = parse_machines_file(
        f"ssh://nix@b1 x86_64-linux /k 2 1.5 kvm - {base64.b64encode(KEY.encode()).decode()}\n"
        "ssh://b2 aarch64-linux\n"
    )
    text = render_ssh_builders_toml(builders)
    assert RunnerConfig(**tomllib.loads(text)).ssh_builders == builders
    assert render_ssh_builders_toml([]) == ""


# ---- config ----------------------------------------------------------------------------------


def _cfg(require: bool = True) -> RunnerConfig:
    return RunnerConfig(
        ssh_require_host_key=require,
        ssh_builders=[
            SshBuilderSection(uri="ssh://pinned", systems=["x"], host_key=KEY),
            SshBuilderSection(uri="ssh://u@unpinned:2200", systems=["x"]),
            SshBuilderSection(uri="ssh://off", systems=["x"], host_key=KEY, enabled=False),
            SshBuilderSection(uri="ssh://offunpinned", systems=["x"], enabled=False),
        ],
    )


def test_usable_ssh_builders_and_warnings() -> None:
    cfg = _cfg()
    assert RunnerConfig().ssh_require_host_key is True
    assert [b.name for b in cfg.usable_ssh_builders()] == ["pinned"]
    (warning,) = ssh_builder_warnings(cfg)
    assert "u@unpinned:2200" in warning and "never used" in warning

    loose = _cfg(require=False)
    assert [b.name for b in loose.usable_ssh_builders()] == ["pinned", "u@unpinned:2200"]
    (warning,) = ssh_builder_warnings(loose)
    assert "known_hosts" in warning
    assert ssh_builder_warnings(RunnerConfig()) == []


def test_config_normalises_and_validates() -> None:
    b = SshBuilderSection(uri="ssh://h", systems=["x"], host_key=f"  {KEY} root@h\n")
    assert b.host_key == KEY
    assert SshBuilderSection(uri="ssh://h", systems=["x"], host_key=" ").host_key is None
    bads: list[dict[str, object]] = [
        {"uri": "ssh-ng://h"},
        {"systems": []},
        {"systems": ["a b"]},
        {"ssh_key": "/a b"},
        {"host_key": "# comment"},
        {"speed_factor": float("inf")},
        {"max_jobs": 0},
        {"bogus": 1},
    ]
    for bad in bads:
        args: dict[str, object] = {"uri": "ssh://h", "systems": ["x"], **bad}
        with pytest.raises(ValueError):
            SshBuilderSection(**args)  # type: ignore[arg-type]


def test_load_runner_config_toml_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "runner.toml"
    path.write_text(
        "ssh_require_host_key = true\n"
        "[[ssh_builders]]\n"
        'uri = "ssh://nix@[::1]:2222"\n'
        'systems = ["x86_64-linux"]\n'
        f'host_key = "{KEY}"\n'
    )
    cfg = load_runner_config(path)
    assert cfg.ssh_builders[0].target == SshTarget("nix", "::1", 2222)
    monkeypatch.setenv("BIGTENT_SSH_REQUIRE_HOST_KEY", "false")
    assert load_runner_config(path).ssh_require_host_key is False
    path.write_text('[[ssh_builders]]\nuri = "ssh://h:99999"\nsystems = ["x"]\n')
    with pytest.raises(ConfigError, match=r"ssh_builders\.0\.uri.*invalid port"):
        load_runner_config(path)


def test_find_builder() -> None:
    builders = [*_cfg().ssh_builders, SshBuilderSection(uri="ssh://v@pinned:2", systems=["x"])]
    assert find_builder(builders, "u@unpinned:2200").uri == "ssh://u@unpinned:2200"
    assert find_builder(builders, "ssh://u@unpinned:2200").uri == "ssh://u@unpinned:2200"
    assert find_builder(builders, "unpinned").uri == "ssh://u@unpinned:2200"
    assert find_builder(builders, "pinned").uri == "ssh://pinned"
    with pytest.raises(ConfigError, match="no SSH builder named 'x'"):
        find_builder(builders, "x")
    dup = [*builders, SshBuilderSection(uri="ssh://w@unpinned", systems=["x"])]
    with pytest.raises(ConfigError, match="ambiguous"):
        find_builder(dup, "unpinned")
