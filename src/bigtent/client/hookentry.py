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

import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import IO

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
        from bigtent.client import nixhook

        nixhook.LogSink(nixhook.open_log(), stderr).error(f"cannot read Nix's request: {exc}")
        return 1
    if accepted is None:
        return 0
    from bigtent.client import nixhook

    request, wanted = accepted
    return nixhook.after_accept(args, settings, request.drv_path, wanted, stderr)


if __name__ == "__main__":
    sys.exit(main())
