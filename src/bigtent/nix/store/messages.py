"""What a failed Nix command says (pure): the command line quoted, an evaluation's whole error,
the line of stderr that says what went wrong.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

COMMAND_SHOWN_CHARS = 4000
"""The longest command line an error message quotes (a path-info of a whole closure names
thousands of paths): longer ones end with a count of the arguments left out."""


def command_line(argv: Sequence[str], limit: int = COMMAND_SHOWN_CHARS) -> str:
    """``argv`` as a shell command (quoted so that it can be run again), whole when it fits in
    ``limit`` characters, else its first arguments and how many more there were."""
    shown: list[str] = []
    size = 0
    for index, arg in enumerate(argv):
        word = shlex.quote(arg)
        if shown and size + len(word) + 1 > limit:
            return " ".join(shown) + f" … ({len(argv) - index} more arguments)"
        shown.append(word)
        size += len(word) + 1
    return " ".join(shown)


def evaluation_failure(argv: Sequence[str], status: int | None, stderr: str) -> str:
    """The message of a failed evaluation: Nix's whole error as it printed it (message,
    ``at FILE:LINE:COL``, code frame, trace), then the command that failed."""
    text = stderr.strip("\n").rstrip() or "(Nix printed nothing)"
    return f"evaluation failed (exit {status}):\n{text}\ncommand: {command_line(argv)}"


def last_error_line(stderr: str) -> str:
    """The last ``error:`` line of Nix's stderr (else its last line): what went wrong. When
    the build hook declined every remote machine, Nix's last line only says so ("unable to
    start any build; remote machines may not have all required system features"): the line
    that says why a machine was given up ("cannot build on 'URI': …") comes first."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    why = [line for line in lines if "cannot build on '" in line]
    for line in reversed(lines):
        if line.startswith("error:"):
            return (
                f"{why[-1].strip()}; {line}"
                if why and "unable to start any build" in line
                else line
            )
    return lines[-1] if lines else ""
