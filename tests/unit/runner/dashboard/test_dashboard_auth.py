"""Who may read and act on the dashboard, and which posted forms count as its own (pure)."""

from __future__ import annotations

import pytest

from bigtent.config import DashboardAuth, Role
from bigtent.errors import AuthError, Forbidden
from bigtent.runner.auth.tokens import Principal
from bigtent.runner.dashboard.auth import (
    SessionStore,
    Via,
    Viewer,
    check_action,
    may_read,
    normalize_origin,
    origin_allowed,
    safe_next,
)

ADMIN = Principal("root", Role.ADMIN)
CLIENT = Principal("ci", Role.CLIENT)
SITE = ["http://127.0.0.1:8080", "https://ci.example.org"]


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("HTTPS://CI.Example.org:443/path?q", "https://ci.example.org"),
        ("http://host:80", "http://host"),
        ("http://[::1]:8080/x", "http://[::1]:8080"),
        ("ftp://host", None),
        ("null", None),
        ("http://", None),
        ("http://host:99999", None),
        ("", None),
    ],
)
def test_normalize_origin(url: str, want: str | None) -> None:
    assert normalize_origin(url) == want


@pytest.mark.parametrize(
    ("origin", "referer", "ok"),
    [
        ("http://127.0.0.1:8080", None, True),
        ("https://ci.example.org", "http://evil.example/", True),  # Origin decides
        ("http://evil.example", "http://127.0.0.1:8080/builds/1", False),
        ("http://127.0.0.1:8081", None, False),
        ("https://127.0.0.1:8080", None, False),
        ("null", "http://127.0.0.1:8080/", False),
        (None, "http://127.0.0.1:8080/builds/1", True),
        (None, "https://ci.example.org:443/x", True),
        (None, "http://evil.example/http://127.0.0.1:8080/", False),
        (None, None, False),
        (None, "", False),
    ],
)
def test_origin_allowed(origin: str | None, referer: str | None, ok: bool) -> None:
    assert origin_allowed(origin, referer, SITE) is ok


def _session_viewer(principal: Principal | None, csrf: str = "tok") -> Viewer:
    store = SessionStore()
    session = store.create(b"d" * 32)
    session.csrf = csrf
    return Viewer(principal, Via.SESSION if principal else Via.NONE, session)


def test_an_admin_session_acts_with_its_csrf_token_from_this_site() -> None:
    assert check_action(_session_viewer(ADMIN), csrf="tok", origin_ok=True) is ADMIN


@pytest.mark.parametrize(
    ("viewer", "csrf", "origin_ok", "error"),
    [
        (Viewer(None, Via.NONE), "tok", True, AuthError),
        (_session_viewer(CLIENT), "tok", True, Forbidden),
        (_session_viewer(ADMIN), None, True, Forbidden),
        (_session_viewer(ADMIN), "", True, Forbidden),
        (_session_viewer(ADMIN), "tok2", True, Forbidden),
        (_session_viewer(ADMIN), "tok", False, Forbidden),
        (Viewer(ADMIN, Via.OPEN, None), "tok", True, Forbidden),  # no session: no token
        (Viewer(CLIENT, Via.BEARER), None, False, Forbidden),
    ],
)
def test_refused_actions(
    viewer: Viewer, csrf: str | None, origin_ok: bool, error: type[Exception]
) -> None:
    with pytest.raises(error):
        check_action(viewer, csrf=csrf, origin_ok=origin_ok)


def test_a_bearer_admin_needs_no_csrf_token() -> None:
    assert check_action(Viewer(ADMIN, Via.BEARER), csrf=None, origin_ok=False) is ADMIN


def test_may_read() -> None:
    nobody = Viewer(None, Via.NONE)
    assert may_read(nobody, DashboardAuth.PUBLIC)
    assert not may_read(nobody, DashboardAuth.TOKEN)
    assert may_read(Viewer(CLIENT, Via.SESSION), DashboardAuth.TOKEN)
    assert may_read(Viewer(Principal("anonymous", Role.ADMIN), Via.OPEN), DashboardAuth.TOKEN)


@pytest.mark.parametrize(
    ("target", "want"),
    [
        ("/builds/3", "/builds/3"),
        ("/agents?x=1", "/agents?x=1"),
        (None, "/"),
        ("", "/"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("builds/3", "/"),
    ],
)
def test_safe_next(target: str | None, want: str) -> None:
    assert safe_next(target) == want


def test_sessions_expire_and_are_bounded() -> None:
    now = [1000.0]
    store = SessionStore(ttl_secs=60, max_sessions=2, clock=lambda: now[0])
    a = store.create(None)
    b = store.create(b"x")
    assert store.get(a.id) is a and store.get(b.id) is b
    assert a.id != b.id and a.csrf != b.csrf and len(a.csrf) >= 32
    c = store.create(None)  # a third: the oldest goes
    assert store.get(a.id) is None and store.get(c.id) is c
    now[0] += 61
    assert store.get(b.id) is None and store.get(c.id) is None
    assert len(store) == 0
    assert store.get(None) is None and store.get("") is None
    store.drop("unknown")
