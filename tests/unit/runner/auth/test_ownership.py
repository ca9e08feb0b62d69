"""The one rule for build actions (cancel, bump, restart): a client acts on the builds it
created, an admin on all, an agent on none."""

from __future__ import annotations

import pytest

from bigtent.config import Role
from bigtent.errors import Forbidden
from bigtent.runner.auth.ownership import BuildAction, check_build_action, may_act
from bigtent.runner.auth.tokens import Principal


@pytest.mark.parametrize(
    ("principal", "created_by", "allowed"),
    [
        pytest.param(Principal("ci-main", Role.CLIENT, trusted=True), "ci-main", True, id="owner"),
        pytest.param(Principal("pr-7", Role.CLIENT), "pr-7", True, id="untrusted-owner"),
        pytest.param(Principal("pr-7", Role.CLIENT), "ci-main", False, id="pr-on-main"),
        pytest.param(
            Principal("ci-other", Role.CLIENT, trusted=True), "ci-main", False, id="other-client"
        ),
        pytest.param(Principal("root", Role.ADMIN), "ci-main", True, id="admin"),
        pytest.param(Principal("anonymous", Role.ADMIN), "ci-main", True, id="open-runner"),
        pytest.param(Principal("ci-main", Role.AGENT), "ci-main", False, id="agent-same-name"),
        pytest.param(Principal("ci-main", Role.CLIENT), "CI-MAIN", False, id="case-differs"),
        pytest.param(Principal("", Role.CLIENT), "", False, id="empty-names"),
        pytest.param(Principal("ci", Role.CLIENT), "ci-main", False, id="prefix"),
    ],
)
def test_may_act(principal: Principal, created_by: str, allowed: bool) -> None:
    assert may_act(principal, created_by) is allowed
    for action in BuildAction:
        if allowed:
            check_build_action(principal, action, 7, created_by)
        else:
            with pytest.raises(Forbidden) as err:
                check_build_action(principal, action, 7, created_by)
            assert err.value.http_status == 403
            assert f"may not {action} build 7" in str(err.value)
