"""How a forge's answer is judged (rate limits, permanent refusals, transient errors) and the
GitHub App's token arithmetic: pure functions, no network."""

from __future__ import annotations

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bigtent.errors import ForgeFailed
from bigtent.runner.forge.github import app_jwt, token_expiry
from bigtent.runner.forge.http import SECONDARY_LIMIT_WAIT_SECS, failure

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("status", "headers", "body", "limited", "wait", "permanent"),
    [
        # GitHub's secondary rate limit: 403 with Retry-After
        (
            403,
            {"retry-after": "17"},
            b'{"message": "You have exceeded a secondary rate limit"}',
            True,
            17.0,
            False,
        ),
        # ... and without it: at least a minute
        (
            403,
            {},
            b'{"message": "You have exceeded a secondary rate limit."}',
            True,
            SECONDARY_LIMIT_WAIT_SECS,
            False,
        ),
        # the primary limit used up: until its reset
        (
            403,
            {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(NOW) + 90)},
            b'{"message": "API rate limit exceeded"}',
            True,
            90.0,
            False,
        ),
        (429, {"retry-after": "3"}, b"", True, 3.0, False),
        # a 403 that is not a limit: a missing permission (tried again with backoff)
        (403, {}, b'{"message": "Resource not accessible by integration"}', False, None, False),
        (401, {}, b'{"message": "Bad credentials"}', False, None, False),
        (502, {}, b"<html>bad gateway</html>", False, None, False),
        (422, {}, b'{"message": "Validation Failed"}', False, None, True),
        (404, {}, b'{"message": "Not Found"}', False, None, True),
    ],
)
def test_failures_are_judged_by_status_and_headers(
    status: int,
    headers: dict[str, str],
    body: bytes,
    limited: bool,
    wait: float | None,
    permanent: bool,
) -> None:
    exc = failure(status, headers, body, NOW, "GitHub: creating check run 'x'")
    assert isinstance(exc, ForgeFailed)
    assert exc.status == status
    assert exc.rate_limited is limited
    assert exc.retry_after_secs == wait
    assert exc.permanent is permanent
    assert str(exc).startswith("GitHub: creating check run 'x'")


def test_the_app_jwt_is_rs256_backdated_and_short_lived() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    token = app_jwt(1234, pem, NOW)
    claims = jwt.decode(
        token, key.public_key(), algorithms=["RS256"], options={"verify_exp": False}
    )
    assert claims == {"iss": "1234", "iat": int(NOW) - 60, "exp": int(NOW) - 60 + 540}
    with pytest.raises(ForgeFailed, match="cannot sign"):
        app_jwt(1234, b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n", NOW)


def test_token_expiry_reads_github_s_timestamps() -> None:
    assert token_expiry("2023-11-14T22:13:20Z", NOW) == NOW
    assert token_expiry(None, NOW) == NOW + 3600
    assert token_expiry("tomorrow", NOW) == NOW + 3600
