"""The templates render what the views hand them: an OIDC agent's identity, launches, SSH
builders skipped with their reason, and actions only for admins (with a CSRF field)."""

from __future__ import annotations

import re
from typing import Any

from bigtent.config import DashboardAuth, Role
from bigtent.runner.auth.tokens import Principal
from bigtent.runner.dashboard.auth import SessionStore, Via, Viewer
from bigtent.runner.dashboard.shell import environment
from bigtent.runner.dashboard.views import AgentRow, AgentsPage, LaunchRow

NOW = 1_700_000_000.0


def _agent(**overrides: Any) -> AgentRow:
    fields: dict[str, Any] = dict(
        machine_id="m1",
        name="gha-42",
        hostname="runner-vm",
        systems=["x86_64-linux"],
        features=[],
        ephemeral=True,
        auth_kind="oidc",
        oidc={
            "issuer": "https://token.actions.githubusercontent.com",
            "repository": "acme/widgets",
            "subject": "repo:acme/widgets:ref:refs/heads/main",
            "workflow_ref": "acme/widgets/.github/workflows/ci.yml@refs/heads/main",
            "ref": "refs/heads/main",
        },
        launch_id="launch-7",
        version="0.1.0",
        connected=True,
        draining=False,
        last_seen=NOW - 5,
        running=1,
        max_jobs=2,
        load=0.5,
        memory="1.0 GiB / 4.0 GiB",
        backoff_until=NOW + 30,
        consecutive_failures=3,
        succeeded=4,
        failed=1,
        infra_failures=3,
    )
    fields.update(overrides)
    return AgentRow(**fields)


def _render(viewer: Viewer, page: AgentsPage) -> str:
    return (
        environment()
        .get_template("agents.html")
        .render(
            viewer=viewer,
            csrf=viewer.session.csrf if viewer.session else "",
            can_act=viewer.is_admin,
            mode=DashboardAuth.PUBLIC,
            path="/agents",
            a=page,
            title="Agents",
        )
    )


def test_agents_page_shows_identity_launches_builders_and_backoff() -> None:
    page = AgentsPage(
        now=NOW,
        agents=[
            _agent(),
            _agent(
                machine_id="m2",
                name="box",
                ephemeral=False,
                auth_kind="token",
                oidc=None,
                launch_id=None,
                backoff_until=None,
                trusted=False,
            ),
        ],
        builders=[{"uri": "ssh://nix@builder1", "usable": False, "reason": "no host_key pinned"}],
        launches=[LaunchRow("launch-7", "gha-x86_64-linux", "registered", NOW - 60, "gha-42")],
    )
    html = _render(Viewer(None, Via.NONE), page)
    assert 'data-name="gha-42" data-ephemeral="true"' in html
    assert 'data-name="box" data-ephemeral="false"' in html
    assert "acme/widgets" in html and "repo:acme/widgets:ref:refs/heads/main" in html
    assert "launch launch-7" in html
    assert "in 30 s" in html and "3 failures" in html
    assert "ssh://nix@builder1" in html and "no host_key pinned" in html
    assert "gha-x86_64-linux" in html and "registered" in html
    assert "Drain" not in html  # not signed in: no actions
    box = html[html.index('data-name="box"') :]
    assert "untrusted" in box[: box.index("</tr>")]  # the untrusted venue is marked
    gha = html[html.index('data-name="gha-42"') :]
    assert "untrusted" not in gha[: gha.index("</tr>")]


def test_admins_get_drain_forms_with_the_session_csrf_token() -> None:
    session = SessionStore().create(b"x")
    viewer = Viewer(Principal("root", Role.ADMIN), Via.SESSION, session)
    html = _render(viewer, AgentsPage(now=NOW, agents=[_agent()], builders=[]))
    forms = re.findall(
        r'<form class="inline" action="([^"]+)" method="post">'
        r'<input type="hidden" name="csrf" value="([^"]+)">',
        html,
    )
    assert ("/agents/m1/drain", session.csrf) in forms
    assert "No autoscaler launches." in html
    assert "No SSH builders are configured" in html
