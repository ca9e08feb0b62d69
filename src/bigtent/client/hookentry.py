"""The start of ``bigtent-nix-hook``: Nix's wire format and the answer to its ``try``.

Nix waits for the hook's answer before it looks at anything else, and starts a new hook
process for the next derivation after each accept: the time from the process's start to its
answer is paid once per derivation, one derivation after another. This module therefore
imports only what the interpreter has loaded anyway (``os``, ``struct``, ``sys``: no
``typing``, ``enum`` or ``argparse``); ``nixhook`` with its options, the helper and the farm's
side is imported after ``# accept``. The wire (64-bit little-endian integers, strings padded to
8 bytes) and the conversation are described in ``nixhook``.
"""

from __future__ import annotations

import os
import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import IO, Protocol

    class Conn(Protocol):
        """What the relay needs of a connected stream socket."""

        def sendall(self, data: bytes, /) -> None: ...

        def recv(self, n: int, /) -> bytes: ...


MACHINE_NAME = "bigtent"
"""What Nix prints as the machine: ``building '/nix/store/…drv' on 'bigtent'``."""
MAX_STRING = 64 * 1024 * 1024
"""The longest string the hook reads from Nix (a setting can be long, never this long)."""


class HookError(Exception):
    """The wire from Nix broke or carried something the hook cannot read."""


class Reply:
    """The hook's answers to a ``try`` (plain strings: no ``enum`` before the answer)."""

    ACCEPT = "accept"
    DECLINE = "decline"
    POSTPONE = "postpone"
    DECLINE_PERMANENTLY = "decline-permanently"


class WireReader:
    """Reads Nix's wire format from a binary stream."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream

    def _exactly(self, n: int) -> bytes:
        data = self.stream.read(n)
        if data is None or len(data) != n:
            raise EOFError("Nix closed the build hook's input")
        return data

    def read_int(self) -> int:
        value: int = struct.unpack("<Q", self._exactly(8))[0]
        return value

    def read_str(self) -> str:
        n = self.read_int()
        if n > MAX_STRING:
            raise HookError(f"Nix sent a string of {n} bytes to the build hook")
        data = self._exactly(n)
        self._exactly((8 - n % 8) % 8)
        return data.decode()

    def read_strs(self) -> list[str]:
        return [self.read_str() for _ in range(self.read_int())]


def put_int(n: int) -> bytes:
    return struct.pack("<Q", n)


def put_str(s: str) -> bytes:
    data = s.encode()
    return put_int(len(data)) + data + b"\0" * ((8 - len(data) % 8) % 8)


def put_strs(items: Sequence[str]) -> bytes:
    return put_int(len(items)) + b"".join(put_str(s) for s in items)


def read_settings(wire: WireReader) -> dict[str, str]:
    """The parent's settings, sent once when the hook starts."""
    settings: dict[str, str] = {}
    while wire.read_int():
        name = wire.read_str()
        settings[name] = wire.read_str()
    return settings


class TryRequest:
    """One ``try``: a derivation Nix would build."""

    __slots__ = ("am_willing", "drv_path", "required_features", "system")

    def __init__(
        self, am_willing: bool, system: str, drv_path: str, required_features: frozenset[str]
    ) -> None:
        self.am_willing = am_willing
        """Whether Nix could build it itself right now (a free local slot)."""
        self.system = system
        self.drv_path = drv_path
        self.required_features = required_features

    def _key(self) -> tuple[bool, str, str, frozenset[str]]:
        return (self.am_willing, self.system, self.drv_path, self.required_features)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TryRequest) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"TryRequest{self._key()!r}"


def read_try(wire: WireReader) -> TryRequest | None:
    """The next ``try``, or None when Nix has no more (end of input or another word)."""
    try:
        word = wire.read_str()
    except EOFError:
        return None
    if word != "try":
        return None
    return TryRequest(
        am_willing=bool(wire.read_int()),
        system=wire.read_str(),
        drv_path=wire.read_str(),
        required_features=frozenset(wire.read_strs()),
    )


def encode_try(request: TryRequest) -> bytes:
    """What Nix sends for ``request`` (for tests)."""
    return (
        put_str("try")
        + put_int(int(request.am_willing))
        + put_str(request.system)
        + put_str(request.drv_path)
        + put_strs(sorted(request.required_features))
    )


def encode_settings(settings: Mapping[str, str]) -> bytes:
    """What Nix sends first (for tests)."""
    return b"".join(put_int(1) + put_str(k) + put_str(v) for k, v in settings.items()) + put_int(0)


def reply_line(reply: str) -> bytes:
    line = f"# {reply}\n"
    if reply == Reply.ACCEPT:
        line += MACHINE_NAME + "\n"
    return line.encode()


def farm_systems(given: frozenset[str], settings: Mapping[str, str]) -> frozenset[str]:
    """The systems sent to the farm: ``--system``, else what the local Nix builds (its
    ``system`` and ``extra-platforms``)."""
    if given:
        return given
    local = {settings.get("system", "")} | set(settings.get("extra-platforms", "").split())
    return frozenset(s for s in local if s)


def decide(request: TryRequest, systems: frozenset[str], *, runner_ok: bool | None) -> str:
    """Accept a derivation of a system the farm builds; decline the rest (Nix builds them
    itself or says it cannot). ``runner_ok`` False (an unreachable runner with
    ``on-unreachable = local``) declines everything. ``builtin`` derivations (``fetchurl``)
    are Nix's own and stay local."""
    if runner_ok is False or request.system == "builtin":
        return Reply.DECLINE
    return Reply.ACCEPT if request.system in systems else Reply.DECLINE


def quick_options(argv: Sequence[str]) -> tuple[frozenset[str], bool]:
    """The two options the answer depends on, read without ``argparse``: the ``--system``s
    and whether ``--on-unreachable local`` was given (the whole command line is checked by
    ``nixhook.parse_args`` after the answer)."""
    systems: set[str] = set()
    local = False
    for i, arg in enumerate(argv):
        value = argv[i + 1] if i + 1 < len(argv) else ""
        name, eq, inline = arg.partition("=")
        if eq:
            value = inline
        if name == "--system" and value:
            systems.add(value)
        elif name == "--on-unreachable":
            local = value == "local"
    return frozenset(systems), local


def answer(
    wire: WireReader,
    stderr: IO[bytes],
    systems: frozenset[str],
    runner_ok: Callable[[TryRequest], bool | None],
) -> tuple[TryRequest, list[str]] | None:
    """Answer Nix's ``try``s until one is accepted: that request and its wanted outputs, or
    None when Nix has no more. ``runner_ok`` is asked before an accept (None: not checked)."""
    while True:
        request = read_try(wire)
        if request is None:
            return None
        reply = decide(request, systems, runner_ok=None)
        if reply == Reply.ACCEPT:
            reply = decide(request, systems, runner_ok=runner_ok(request))
        stderr.write(reply_line(reply))
        stderr.flush()
        if reply != Reply.ACCEPT:
            continue
        wire.read_strs()  # the inputs: the farm takes them from its cache, or builds them
        return request, wire.read_strs()


# ---- the hand-over to the helper, without heavy imports ------------------------------------
#
# After ``# accept`` the derivation reaches the farm only once the helper has its request:
# on a loaded machine importing ``nixhook`` (``enum``, ``re``, ``logging``, ``argparse``),
# ``socket`` and ``json`` took 0.3-0.6 s per derivation, on the critical path of every layer
# (docs/benchmarks.md). When the helper already listens, the hook reads the few options it
# needs itself, talks over ``_socket`` and writes its own JSON; anything unusual (no helper
# yet, ``--no-helper``, an option this reader does not know) takes ``nixhook``'s full path.

HOOK_OPTIONS = frozenset(
    {
        "--runner", "--token-file", "--oidc", "--audience", "--ca-file", "--system",
        "--on-unreachable", "--poll-interval", "--public-key", "--socket", "--helper-idle",
    }
)  # fmt: skip
"""Options taking a value, as ``nixhook.parse_args`` has them."""


def local_store_uri(settings: Mapping[str, str]) -> str:
    """The store the parent Nix builds into ("" for Nix's default, e.g. under the daemon)."""
    store = settings.get("store", "")
    return "" if store in ("auto", "daemon") else store


def socket_path(
    runner_url: str, token: str, audience: str, ca_file: str, uid: int, env: Mapping[str, str]
) -> str:
    """The helper's default socket: one per runner and credential in ``$XDG_RUNTIME_DIR``,
    ``/run/bigtent-nix-hook`` for root, or ``/tmp/bigtent-nix-hook-UID`` (whose directory
    others may create first: ``is_private_dir`` is checked before connecting)."""
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]  # no OpenSSL to load
    except ImportError:  # an interpreter without it: the same digest
        from hashlib import sha256
    key = "\0".join([runner_url, token, audience, ca_file])
    digest: str = sha256(key.encode()).hexdigest()
    name = "helper-" + digest[:16] + ".sock"
    base = env.get("XDG_RUNTIME_DIR") or ROOT_HELPER_DIR
    if base == ROOT_HELPER_DIR and (uid != 0 or not os.path.isdir("/run")):
        base = f"/tmp/bigtent-nix-hook-{uid}"
    return base.rstrip("/") + "/" + name


ROOT_HELPER_DIR = "/run/bigtent-nix-hook"
"""The helper's directory for root without ``$XDG_RUNTIME_DIR`` (as under the Nix daemon):
in /run, where other users cannot create it first."""


def is_private_dir(path: str) -> bool:
    """Whether ``path`` is a directory of this user that no other may enter: only then is a
    helper listening in it this user's own (anyone may create ``/tmp/bigtent-nix-hook-0``
    first and serve a fake helper there)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    is_dir = (st.st_mode & 0o170000) == 0o040000
    return is_dir and st.st_uid == os.getuid() and not st.st_mode & 0o077


def quick_socket(argv: Sequence[str], env: Mapping[str, str], uid: int) -> str | None:
    """The helper's socket for this command line, read without ``argparse``; None when the
    full parser must look (an option it does not know, ``--no-helper``, ``--oidc``, a token
    file that cannot be read). Must agree with
    ``hookhandover.helper_socket(nixhook.parse_args(...))``."""
    values: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        if i == len(args) - 1 and args[i].isdigit():
            break  # the verbosity Nix appends
        name, eq, value = args[i].partition("=")
        if name not in HOOK_OPTIONS:
            return None
        if not eq:
            if i + 1 >= len(args):
                return None
            i += 1
            value = args[i]
        values[name] = value
        i += 1
    if "--oidc" in values:
        return None  # a CI job's ID token: fetched by the full path, anew each time
    if "--socket" in values:
        return values["--socket"]
    if "--token-file" in values:
        try:
            with open(values["--token-file"]) as f:
                token = f.read().strip()
        except OSError:
            return None
        if not token:
            return None
    else:
        token = env.get("BIGTENT_TOKEN") or ""
    runner = values.get("--runner", env.get("BIGTENT_URL", "http://127.0.0.1:8470"))
    ca_file = values.get("--ca-file", env.get("BIGTENT_CA_FILE") or "")
    return socket_path(runner, token, "", ca_file, uid, env)


def json_str(text: str) -> str:
    """``text`` as a JSON string (what ``json.dumps`` gives, without importing ``json``)."""
    out = []
    for ch in text:
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def encode_request(drv_path: str, wanted: Sequence[str], store_uri: str) -> bytes:
    """The one request line the helper reads."""
    outputs = ", ".join(json_str(w) for w in wanted)
    line = f'{{"drv": {json_str(drv_path)}, "wanted": [{outputs}], "store": {json_str(store_uri)}}}'
    return line.encode() + b"\n"


def escape_line(text: str) -> str:
    """One reply's text on one line (``\\`` and newlines escaped)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def unescape_line(text: str) -> str:
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"n": "\n", "r": "\r"}.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def nix_message(text: str) -> bytes:
    """An error Nix prints from the hook's stderr after the answer (``@nix`` JSON)."""
    return b'@nix {"action": "msg", "level": 0, "msg": ' + json_str(text).encode() + b"}\n"


def relay(
    conn: Conn, request: bytes, write_log: Callable[[str], None], error: Callable[[str], None]
) -> int | None:
    """Send the request, then hand the helper's replies on: ``log TEXT`` lines to
    ``write_log``, ``error TEXT`` to ``error``; the status of ``exit N``, or None when the
    helper closed the connection first."""
    conn.sendall(request)
    pending = b""
    while True:
        data = conn.recv(65536)
        if not data:
            return None
        *lines, pending = (pending + data).split(b"\n")
        for raw in lines:
            kind, _, rest = raw.decode(errors="replace").partition(" ")
            if kind == "log":
                write_log(unescape_line(rest))
            elif kind == "error":
                error(unescape_line(rest))
            elif kind == "exit":
                return int(rest) if rest.lstrip("-").isdigit() else 1


def fast_hand_over(
    argv: Sequence[str], settings: Mapping[str, str], drv_path: str, wanted: Sequence[str]
) -> int | None:
    """Hand the accepted derivation to a helper that already listens, and relay its replies
    to Nix (fd 4, stderr); None when the full path must do it (see ``quick_socket``)."""
    import _socket

    path = quick_socket(argv, os.environ, os.getuid())
    if path is None or not is_private_dir(os.path.dirname(path)):
        return None  # the full path decides (and says why it will not use that directory)
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            conn.connect(path)
        except OSError:
            return None  # no helper yet: the full path starts one
        try:
            os.fstat(4)
            log_fd = 4
        except OSError:
            log_fd = 2

        def write_log(text: str) -> None:
            data = "".join(line + "\n" for line in text.splitlines() or [""])
            os.write(log_fd, data.encode(errors="replace"))

        def error(text: str) -> None:
            write_log(f"bigtent: {text}")
            os.write(2, nix_message(f"bigtent: {text}"))

        request = encode_request(drv_path, wanted, local_store_uri(settings))
        code = relay(conn, request, write_log, error)
        if code is None:
            error(f"the helper at {path} stopped before {drv_path} was built")
            return 1
        return code
    finally:
        conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bigtent-nix-hook`` (and ``bigtent nix-hook``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    systems, local = quick_options(args)
    if local or "-h" in args or "--help" in args:
        from bigtent.client import nixhook  # the probe needs the whole client anyway

        return nixhook.main(args)
    stderr = sys.stderr.buffer
    wire = WireReader(sys.stdin.buffer)
    try:
        settings = read_settings(wire)
        accepted = answer(wire, stderr, farm_systems(systems, settings), lambda _: None)
    except (EOFError, HookError, UnicodeDecodeError) as exc:
        from bigtent.client.hookcommon import LogSink, open_log

        LogSink(open_log(), stderr).error(f"cannot read Nix's request: {exc}")
        return 1
    if accepted is None:
        return 0
    request, wanted = accepted
    code = fast_hand_over(args, settings, request.drv_path, wanted)
    if code is not None:
        return code
    from bigtent.client import nixhook

    return nixhook.after_accept(args, settings, request.drv_path, wanted, stderr)


if __name__ == "__main__":
    sys.exit(main())
