"""Who is looking at the dashboard, and whether they may act (docs/dashboard.md).

Reading is public or needs any valid token (``runner.dashboard_auth``). A browser signs in
with a token once: the runner keeps a session (in memory) holding the token's *digest* and a
random CSRF token, and the browser only a random session id in an ``HttpOnly``,
``SameSite=Strict`` cookie. Every request checks the digest again, so revoking the token
ends its sessions. Scripts may send ``Authorization: Bearer`` instead.

Actions (cancel, restart, bump, drain) need an admin. A form posted with the session cookie
must also carry the session's CSRF token and come from the dashboard's own origin (the
``Origin`` header, or the ``Referer`` when a browser sends no ``Origin``). A bearer header is
never sent by a browser on its own, so requests carrying one need neither.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from bigtent.config import DashboardAuth, Role
from bigtent.errors import AuthError, Forbidden
from bigtent.runner.auth.tokens import Principal

SESSION_COOKIE = "bigtent_session"
SESSION_TTL_SECS = 12 * 3600.0
"""A dashboard session ends this long after sign-in (or when the runner restarts)."""
MAX_SESSIONS = 10_000
"""Sessions kept at once; beyond, the oldest is forgotten."""


class Via(StrEnum):
    """How a request was authenticated."""

    NONE = "none"
    BEARER = "bearer"
    SESSION = "session"
    OPEN = "open"
    """The runner has no tokens at all: everyone is an admin (as on the API)."""


@dataclass(slots=True)
class DashSession:
    id: str
    csrf: str
    token_digest: bytes | None
    """The signed-in token's digest; None for an anonymous session (it only carries the
    CSRF token, on a runner without tokens)."""
    expires_at: float


class SessionStore:
    """Dashboard sessions by id, bounded in number and age."""

    def __init__(
        self,
        *,
        ttl_secs: float = SESSION_TTL_SECS,
        max_sessions: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_secs = ttl_secs
        self.max_sessions = max_sessions
        self.clock = clock
        self._sessions: OrderedDict[str, DashSession] = OrderedDict()

    def create(self, token_digest: bytes | None) -> DashSession:
        session = DashSession(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            token_digest=token_digest,
            expires_at=self.clock() + self.ttl_secs,
        )
        self._sessions[session.id] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> DashSession | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires_at <= self.clock():
            del self._sessions[session_id]
            return None
        return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who made a dashboard request."""

    principal: Principal | None
    via: Via
    session: DashSession | None = None

    @property
    def is_admin(self) -> bool:
        return self.principal is not None and self.principal.role is Role.ADMIN

    @property
    def signed_in(self) -> bool:
        return self.via in (Via.SESSION, Via.BEARER)


def may_read(viewer: Viewer, mode: DashboardAuth) -> bool:
    """``public``: anyone; ``token``: anyone with a valid token (or an open runner)."""
    return mode is DashboardAuth.PUBLIC or viewer.principal is not None


def check_action(
    viewer: Viewer, *, csrf: str | None, origin_ok: bool, admin_only: bool = True
) -> Principal:
    """May this request act (drain: ``admin_only``; cancel, restart, bump: any client or
    admin, then ``ownership.check_build_action`` decides per build)? The principal, or
    AuthError (no credential) / Forbidden (not an admin or client, or a forged form)."""
    if viewer.principal is None:
        raise AuthError("sign in with a client or admin token to do this")
    role = viewer.principal.role
    if role is not Role.ADMIN and (admin_only or role is not Role.CLIENT):
        needs = "admin" if admin_only else "client or admin"
        raise Forbidden(f"token role {role} may not do this (needs {needs})")
    if viewer.via is Via.BEARER:
        return viewer.principal
    if not origin_ok:
        raise Forbidden("the form was not posted from this dashboard (Origin)")
    if viewer.session is None or not csrf or not hmac.compare_digest(viewer.session.csrf, csrf):
        raise Forbidden("missing or wrong CSRF token: reload the page and try again")
    return viewer.principal


def normalize_origin(url: str) -> str | None:
    """``scheme://host[:port]`` of a URL, lowercased, default ports dropped; None when it
    has no scheme or host."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in ("http", "https") or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def origin_allowed(origin: str | None, referer: str | None, allowed: Collection[str]) -> bool:
    """Was a form posted from one of the ``allowed`` origins? The ``Origin`` header decides
    when present (``null``, from a sandboxed or privacy-stripped context, is refused); else
    the ``Referer``; with neither, no."""
    wanted = {o for o in (normalize_origin(a) for a in allowed) if o is not None}
    if origin is not None:
        got = normalize_origin(origin) if origin.strip() != "null" else None
        return got is not None and got in wanted
    if referer:
        got = normalize_origin(referer)
        return got is not None and got in wanted
    return False


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path on this site only (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
