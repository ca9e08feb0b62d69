"""Who sees Nix's own error text of an evaluation (pure).

Nix's message can carry what the evaluated code should never have seen: a "hash mismatch"
error prints the real hash of whatever the code pointed ``fetchTree`` at, and ``throw
(builtins.readFile …)`` prints the file. For a trusted evaluation (a push to a built branch)
the forge, the API and the dashboard show Nix's full message: the project's own maintainers
need it. For an untrusted one (a pull request, a fork) only admins do; the forge and every
other reader get a fixed message that points at the evaluation's page (docs/security.md "CI
evaluation").
"""

from __future__ import annotations

UNTRUSTED_EVAL_ERROR = (
    "evaluation failed (untrusted commit: Nix's message is shown to the runner's admins only)"
)
UNTRUSTED_JOB_ERROR = (
    "this job failed to evaluate (untrusted commit: Nix's message is shown to the runner's "
    "admins only)"
)


def shown_eval_error(error: str | None, *, trusted: bool, admin: bool, url: str = "") -> str | None:
    """An evaluation's error as a reader may see it (None stays None)."""
    if not error or trusted or admin:
        return error
    return f"{UNTRUSTED_EVAL_ERROR}: {url}" if url else UNTRUSTED_EVAL_ERROR


def shown_job_error(error: str | None, *, trusted: bool, admin: bool, url: str = "") -> str | None:
    """A job's evaluation error as a reader may see it (None stays None)."""
    if not error or trusted or admin:
        return error
    return f"{UNTRUSTED_JOB_ERROR}: {url}" if url else UNTRUSTED_JOB_ERROR
