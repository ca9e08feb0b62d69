"""What the runner answers in the CLI tests: a build, agents, the status."""

from __future__ import annotations

from typing import Any

BUILD: dict[str, Any] = {
    "id": 12,
    "state": "running",
    "priority": 10,
    "created_at": "2024-05-01T10:00:00Z",
    "roots": [
        {
            "drv_path": "/nix/store/aaaa-hello.drv",
            "outputs": {"out": "/nix/store/o-hello"},
            "step_id": 4,
            "state": "building",
        }
    ],
    "counts": {"total": 3, "succeeded": 1, "running": 1, "waiting": 1},
}
DONE = {"state": "succeeded"}
AGENT = {
    "machine_id": "m1",
    "name": "build-01",
    "systems": ["x86_64-linux"],
    "supported_features": ["kvm"],
    "mandatory_features": ["big"],
    "max_jobs": 4,
    "running": 1,
    "speed_factor": 2.0,
    "ephemeral": False,
    "auth_kind": "token",
    "connected": True,
}
STATUS = {
    "version": "0.1.0",
    "cache_url": "http://r/cache",
    "cache_public_key": "bt-1:abc",
    "steps": {"running": 1, "waiting": 2},
    "agents_connected": 1,
    "builds_active": 1,
}


EPHEMERAL_AGENT = {
    **AGENT,
    "machine_id": "m2",
    "name": "gha-x86-123.1-0a1b2c3d",
    "ephemeral": True,
    "connected": False,
    "running": 0,
    "max_jobs": 2,
    "last_seen": "2024-05-01T10:00:00+00:00",
    "backoff_until": "2024-05-01T10:05:00+00:00",
    "consecutive_failures": 2,
}


OIDC_IDENTITY = {
    "issuer": "https://token.actions.githubusercontent.com",
    "repository": "acme/widgets",
    "subject": "repo:acme/widgets:ref:refs/heads/main",
    "workflow_ref": "acme/widgets/.github/workflows/agents.yml@refs/heads/main",
    "ref": "refs/heads/main",
}
OIDC_AGENT = {
    **AGENT,
    "machine_id": "m3",
    "name": "gha-oidc-7.1-0c0ffee0",
    "ephemeral": True,
    "auth_kind": "oidc",
    "oidc": OIDC_IDENTITY,
}
