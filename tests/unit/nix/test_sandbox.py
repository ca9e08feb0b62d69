"""The evaluation sandbox's command line and environment (pure): what an evaluation may
reach, and what it must never reach."""

from __future__ import annotations

from pathlib import Path

from bigtent.nix.sandbox import HOME, EvalSandbox, bwrap_argv, sandbox_env

STATE = Path("/var/lib/bigtent")
SANDBOX = EvalSandbox(
    read_only=(STATE / "ci/git/widgets.git",),
    read_write=(STATE / "ci/eval-store", STATE / "ci/xdg/widgets"),
)
HOST = {
    "/usr",
    "/bin",
    "/lib",
    "/lib64",
    "/nix",
    "/etc/nix",
    "/etc/ssl",
    "/etc/passwd",
    "/etc/group",
    "/etc/resolv.conf",
    "/etc/hosts",
}
LINKS = {"/bin": "usr/bin", "/lib": "usr/lib", "/lib64": "usr/lib64"}


def _argv(sandbox: EvalSandbox = SANDBOX) -> list[str]:
    return bwrap_argv(sandbox, exists=HOST.__contains__, link_target=LINKS.get)


def _mounts(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 2] for i, a in enumerate(argv) if a == flag]


def test_only_the_allow_list_is_mounted() -> None:
    argv = _argv()
    assert argv[0] == "bwrap" and argv[-1] == "--"
    read_only = _mounts(argv, "--ro-bind")
    assert read_only == [
        "/usr",
        "/nix",
        "/etc/nix",
        "/etc/ssl",
        "/etc/passwd",
        "/etc/group",
        "/etc/resolv.conf",
        "/etc/hosts",
        str(STATE / "ci/git/widgets.git"),
    ]
    assert _mounts(argv, "--bind") == [str(STATE / "ci/eval-store"), str(STATE / "ci/xdg/widgets")]
    assert _mounts(argv, "--symlink") == ["/bin", "/lib", "/lib64"]
    # Never the state directory itself, its keys, the other projects' mirrors, nor /etc whole.
    mounted = read_only + _mounts(argv, "--bind")
    for forbidden in (str(STATE), str(STATE / "ci"), str(STATE / "ci/git"), "/etc", "/", "/root"):
        assert forbidden not in mounted
    assert not any(m.endswith((".sk", ".pem", "token")) for m in mounted)


def test_missing_host_paths_are_left_out() -> None:
    argv = bwrap_argv(SANDBOX, exists=lambda p: p == "/usr", link_target=lambda p: None)
    assert _mounts(argv, "--ro-bind") == ["/usr", str(STATE / "ci/git/widgets.git")]


def test_namespaces_tmp_home_and_parent_death() -> None:
    argv = _argv()
    for flag in ("--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts"):
        assert flag in argv
    assert "--unshare-net" not in argv
    # A fresh /tmp first, the project's paths after it (a state dir under /tmp stays visible).
    tmpfs = argv.index("--tmpfs")
    assert argv[tmpfs + 1] == "/tmp" and tmpfs < argv.index("--bind")
    assert argv[argv.index("--dir") + 1] == HOME
    # No --new-session: Nix stays in the process group the runner kills on timeout or abort.
    assert "--new-session" not in argv


def test_no_network_unshares_it() -> None:
    argv = _argv(EvalSandbox(read_only=(), read_write=(), network=False))
    assert "--unshare-net" in argv


def test_environment_keeps_no_secrets() -> None:
    environ = {
        "PATH": "/usr/bin:/bin",
        "NIX_SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
        "HOME": "/root",
        "BIGTENT_AUTH__TOKENS": "secret",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "https_proxy": "http://proxy:3128",
    }
    env = sandbox_env(environ, EvalSandbox(extra_env={"XDG_CACHE_HOME": "/x"}))
    assert env == {
        "PATH": "/usr/bin:/bin",
        "NIX_SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
        "https_proxy": "http://proxy:3128",
        "HOME": HOME,
        "XDG_CACHE_HOME": "/x",
    }
