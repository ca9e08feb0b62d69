"""Who may act on a build (pure): cancel, bump and restart, from the API and the dashboard.

One rule: a client acts on the builds it created; an admin on all. A build records its
creator as the name of the token that created it (``builds.created_by``; token names are
unique among configured and stored tokens, and a stored token's name is never reused, even
after it was revoked). A build without a creator is an admin's alone. An agent token acts
on no build. An open runner (no tokens) treats
every request as the admin ``anonymous``.
"""

from __future__ import annotations

from enum import StrEnum

from bigtent.config import Role
from bigtent.errors import Forbidden
from bigtent.runner.auth.tokens import Principal


class BuildAction(StrEnum):
    """An action on a build that changes it (each is recorded as a build event)."""

    CANCEL = "cancel"
    BUMP = "bump"
    RESTART = "restart"


def may_act(principal: Principal, created_by: str) -> bool:
    """Whether ``principal`` may cancel, bump or restart a build created by ``created_by``."""
    if principal.role is Role.ADMIN:
        return True
    # A build without a recorded creator belongs to no client.
    return principal.role is Role.CLIENT and bool(created_by) and principal.name == created_by


def check_build_action(
    principal: Principal, action: BuildAction, build_id: int, created_by: str
) -> None:
    """Raise Forbidden (HTTP 403) unless ``principal`` may do ``action`` on the build."""
    if not may_act(principal, created_by):
        raise Forbidden(
            f"token {principal.name!r} may not {action} build {build_id}: a client acts only "
            "on the builds it created (an admin token on all)"
        )
