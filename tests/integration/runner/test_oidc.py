"""OidcVerifier against a real OIDC issuer on loopback HTTPS (test CA, discovery, JWKS).

Time is an injected clock: the refresh floor is stepped over, never slept through.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bigtent.config import OidcIssuerSection
from bigtent.errors import AuthError, ConfigError
from bigtent.runner.auth.oidc import InvalidToken, IssuerUnavailable, OidcVerifier
from bigtent.runner.auth.policy import AgentIdentity, PolicyDenied
from tests.integration.runner.oidc_issuer import (
    FakeClock,
    LocalIssuer,
    SigningKey,
    TlsFiles,
    forge,
    make_tls,
    mint,
    running_issuer,
)

T0 = 1_900_000_000.0
REPO = "acme/widgets"
SUB = "repo:acme/widgets:ref:refs/heads/main"
WORKFLOW = "acme/widgets/.github/workflows/agents.yml@refs/heads/main"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("oidc-tls"))


@pytest.fixture(scope="module")
def keys() -> list[SigningKey]:
    return [SigningKey.generate(f"key-{i}") for i in range(3)]


@pytest.fixture
def issuer(tls: TlsFiles, keys: list[SigningKey]) -> Iterator[LocalIssuer]:
    yield from running_issuer(tls, keys[:1])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


def rule_for(issuer: LocalIssuer, tls: TlsFiles, **kw: Any) -> OidcIssuerSection:
    base: dict[str, Any] = {
        "issuer": issuer.url,
        "audiences": ["bigtent", "bigtent-staging"],
        "ca_file": str(tls.ca_file),
        "repositories": [REPO],
    }
    return OidcIssuerSection.model_validate(base | kw)


@pytest.fixture
async def verifier(
    issuer: LocalIssuer, tls: TlsFiles, clock: FakeClock
) -> AsyncIterator[OidcVerifier]:
    async with OidcVerifier([rule_for(issuer, tls)], clock=clock) as v:
        yield v


def claims(issuer: LocalIssuer, clock: FakeClock, **change: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": issuer.url,
        "aud": "bigtent",
        "sub": SUB,
        "repository": REPO,
        "ref": "refs/heads/main",
        "workflow_ref": WORKFLOW,
        "job_workflow_ref": WORKFLOW,
        "iat": int(clock.now),
        "nbf": int(clock.now),
        "exp": int(clock.now) + 300,
    }
    return {k: v for k, v in (base | change).items() if v is not None}


async def test_valid_token_becomes_an_identity(
    verifier: OidcVerifier, issuer: LocalIssuer, keys: list[SigningKey], clock: FakeClock
) -> None:
    token = mint(keys[0], claims(issuer, clock))
    assert await verifier.verify(token) == AgentIdentity(
        issuer=issuer.url,
        repository=REPO,
        subject=SUB,
        workflow_ref=WORKFLOW,
        ref="refs/heads/main",
    )
    # Keys are cached: a second token costs no fetch.
    await verifier.verify(mint(keys[0], claims(issuer, clock, aud=["x", "bigtent-staging"])))
    assert (issuer.discovery_fetches, issuer.jwks_fetches) == (1, 1)


async def test_leeway_admits_small_clock_skew(
    verifier: OidcVerifier, issuer: LocalIssuer, keys: list[SigningKey], clock: FakeClock
) -> None:
    skewed = claims(issuer, clock, exp=int(T0) - 30, nbf=int(T0) + 30, iat=int(T0) + 30)
    assert (await verifier.verify(mint(keys[0], skewed))).repository == REPO


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("wrong issuer", {"iss": "https://token.actions.githubusercontent.com"}, "issuer"),
    ("no issuer", {"iss": None}, "issuer"),
    ("wrong audience", {"aud": "someone-else"}, "audience"),
    ("no audience", {"aud": None}, "no aud claim"),
    ("expired beyond leeway", {"exp": int(T0) - 61}, "expired"),
    ("nbf in the future beyond leeway", {"nbf": int(T0) + 61}, "not yet valid"),
    ("iat in the future beyond leeway", {"iat": int(T0) + 61}, "not yet valid"),
    ("no exp", {"exp": None}, "no exp claim"),
    ("exp not a number", {"exp": "soon"}, "malformed|invalid"),
    ("no sub", {"sub": None}, "no sub claim"),
]


@pytest.mark.parametrize(("why", "change", "reason"), REFUSED, ids=[r[0] for r in REFUSED])
async def test_refused_claims(
    verifier: OidcVerifier,
    issuer: LocalIssuer,
    keys: list[SigningKey],
    clock: FakeClock,
    why: str,
    change: dict[str, Any],
    reason: str,
) -> None:
    with pytest.raises(InvalidToken, match=reason) as info:
        await verifier.verify(mint(keys[0], claims(issuer, clock, **change)))
    assert info.value.http_status == 401


POLICY: list[tuple[str, dict[str, Any], str]] = [
    ("repository outside the list", {"repositories": ["acme/other"]}, "repository not allowed"),
    ("empty repository list", {"repositories": []}, "no repository is allowed"),
    ("subject outside the list", {"subjects": ["repo:acme/widgets:environment:x"]}, "subject"),
    ("subject outside the prefixes", {"subject_prefixes": ["repo:acme/widgets:pull"]}, "subject"),
    ("ref outside the list", {"refs": ["refs/heads/release"]}, "ref not allowed"),
    (
        "workflow outside the list",
        {"workflow_refs": ["acme/x/.github/workflows/a.yml@x"]},
        "workflow",
    ),
]


@pytest.mark.parametrize(("why", "rule_change", "reason"), POLICY, ids=[p[0] for p in POLICY])
async def test_policy_denies_a_valid_token(
    issuer: LocalIssuer,
    tls: TlsFiles,
    keys: list[SigningKey],
    clock: FakeClock,
    why: str,
    rule_change: dict[str, Any],
    reason: str,
) -> None:
    async with OidcVerifier([rule_for(issuer, tls, **rule_change)], clock=clock) as v:
        with pytest.raises(PolicyDenied, match=reason) as info:
            await v.verify(mint(keys[0], claims(issuer, clock)))
    assert isinstance(info.value, AuthError) and info.value.http_status == 403


async def test_alg_none_is_refused_before_any_key_lookup(
    verifier: OidcVerifier, issuer: LocalIssuer, keys: list[SigningKey], clock: FakeClock
) -> None:
    for alg in ("none", "None", "NONE"):
        token = forge({"alg": alg, "typ": "JWT", "kid": keys[0].kid}, claims(issuer, clock), None)
        with pytest.raises(InvalidToken, match="algorithm not allowed"):
            await verifier.verify(token)
    assert issuer.jwks_fetches == 0


async def test_hs256_with_the_public_key_as_secret_is_refused(
    verifier: OidcVerifier, issuer: LocalIssuer, keys: list[SigningKey], clock: FakeClock
) -> None:
    # The classic confusion attack: HMAC keyed with the issuer's public key.
    await verifier.verify(mint(keys[0], claims(issuer, clock)))  # keys now cached
    for secret in (keys[0].public_pem(), keys[0].jwk()["n"].encode()):
        token = forge({"alg": "HS256", "kid": keys[0].kid}, claims(issuer, clock), secret)
        with pytest.raises(InvalidToken, match="algorithm not allowed"):
            await verifier.verify(token)


async def test_other_asymmetric_algorithms_are_refused(
    verifier: OidcVerifier, issuer: LocalIssuer, keys: list[SigningKey], clock: FakeClock
) -> None:
    import jwt

    token = jwt.encode(
        claims(issuer, clock), keys[0].private, algorithm="PS256", headers={"kid": keys[0].kid}
    )
    with pytest.raises(InvalidToken, match="algorithm not allowed"):
        await verifier.verify(token)


async def test_missing_kid_is_refused_without_a_fetch(
    verifier: OidcVerifier, issuer: LocalIssuer, keys: list[SigningKey], clock: FakeClock
) -> None:
    with pytest.raises(InvalidToken, match="no key id"):
        await verifier.verify(mint(keys[0], claims(issuer, clock), kid=None))
    assert issuer.jwks_fetches == 0


async def test_unknown_kid_is_refused(
    verifier: OidcVerifier, issuer: LocalIssuer, keys: list[SigningKey], clock: FakeClock
) -> None:
    # Signed by a key the issuer does not publish, under a kid it does not publish.
    with pytest.raises(InvalidToken, match="unknown signing key"):
        await verifier.verify(mint(keys[1], claims(issuer, clock)))
    # Signed by a foreign key but claiming the published kid: the signature does not verify.
    with pytest.raises(InvalidToken, match="signature"):
        await verifier.verify(mint(keys[1], claims(issuer, clock), kid=keys[0].kid))


@pytest.mark.parametrize(
    "where",
    ["other port", "other host", "plain http", "another issuer named"],
)
async def test_discovery_must_stay_on_the_issuer_origin(
    issuer: LocalIssuer,
    tls: TlsFiles,
    keys: list[SigningKey],
    clock: FakeClock,
    where: str,
) -> None:
    if where == "other port":
        issuer.state.jwks_uri = f"https://127.0.0.1:{issuer.port + 1}/.well-known/jwks"
    elif where == "other host":
        issuer.state.jwks_uri = f"https://localhost:{issuer.port}/.well-known/jwks"
    elif where == "plain http":
        issuer.state.jwks_uri = f"http://127.0.0.1:{issuer.port}/.well-known/jwks"
    else:
        issuer.state.discovery_issuer = "https://token.actions.githubusercontent.com"
    async with OidcVerifier([rule_for(issuer, tls)], clock=clock) as v:
        with pytest.raises(IssuerUnavailable) as info:
            await v.verify(mint(keys[0], claims(issuer, clock)))
    assert info.value.http_status == 503
    assert issuer.discovery_fetches == 1
    assert issuer.jwks_fetches == 0


async def test_configured_jwks_url_skips_discovery(
    issuer: LocalIssuer, tls: TlsFiles, keys: list[SigningKey], clock: FakeClock
) -> None:
    rule = rule_for(issuer, tls, jwks_url=f"{issuer.url}/keys")
    async with OidcVerifier([rule], clock=clock) as v:
        assert (await v.verify(mint(keys[0], claims(issuer, clock)))).subject == SUB
    assert (issuer.discovery_fetches, issuer.jwks_fetches) == (0, 1)


async def test_the_issuer_certificate_is_checked(
    issuer: LocalIssuer, tls: TlsFiles, keys: list[SigningKey], clock: FakeClock
) -> None:
    # Without ca_file the system roots apply, and they do not know the test CA.
    rule = rule_for(issuer, tls, ca_file=None)
    async with OidcVerifier([rule], clock=clock) as v:
        with pytest.raises(IssuerUnavailable):
            await v.verify(mint(keys[0], claims(issuer, clock)))
    assert issuer.discovery_fetches == 0


async def test_a_flood_of_random_kids_fetches_once_per_interval(
    verifier: OidcVerifier, issuer: LocalIssuer, keys: list[SigningKey], clock: FakeClock
) -> None:
    def flood() -> list[str]:
        return [mint(keys[1], claims(issuer, clock), kid=secrets.token_hex(8)) for _ in range(100)]

    async def refused(tokens: list[str]) -> None:
        results = await asyncio.gather(
            *(verifier.verify(t) for t in tokens), return_exceptions=True
        )
        assert all(isinstance(r, InvalidToken) for r in results), results
        assert {str(r) for r in results} == {"unknown signing key"}

    tokens = flood()
    await refused(tokens)  # concurrent: they share the first fetch
    assert issuer.jwks_fetches == 1
    clock.now += 30
    await refused(flood())
    assert issuer.jwks_fetches == 1
    clock.now += 31  # past the 60 s floor since the first fetch started
    await refused(flood())
    assert issuer.jwks_fetches == 2
    await refused(flood())
    assert issuer.jwks_fetches == 2
    # A genuine token still verifies from the cache meanwhile.
    assert (await verifier.verify(mint(keys[0], claims(issuer, clock)))).repository == REPO
    assert issuer.jwks_fetches == 2
    assert issuer.discovery_fetches == 1


async def test_concurrent_verifications_share_one_fetch(
    verifier: OidcVerifier, issuer: LocalIssuer, keys: list[SigningKey], clock: FakeClock
) -> None:
    tokens = [mint(keys[0], claims(issuer, clock, sub=f"{SUB}:{i}")) for i in range(20)]
    identities = await asyncio.gather(*(verifier.verify(t) for t in tokens))
    assert len({i.subject for i in identities}) == 20
    assert (issuer.discovery_fetches, issuer.jwks_fetches) == (1, 1)


async def test_key_rotation_is_picked_up_after_the_refresh_interval(
    verifier: OidcVerifier, issuer: LocalIssuer, keys: list[SigningKey], clock: FakeClock
) -> None:
    old, new = keys[0], keys[2]
    await verifier.verify(mint(old, claims(issuer, clock)))
    issuer.publish(new)  # the issuer rotates: the old key is gone
    with pytest.raises(InvalidToken, match="unknown signing key"):
        await verifier.verify(mint(new, claims(issuer, clock)))  # within the floor
    assert issuer.jwks_fetches == 1
    clock.now += 61
    assert (await verifier.verify(mint(new, claims(issuer, clock)))).repository == REPO
    assert issuer.jwks_fetches == 2
    with pytest.raises(InvalidToken, match="unknown signing key"):
        await verifier.verify(mint(old, claims(issuer, clock)))
    assert issuer.jwks_fetches == 2


async def test_keys_older_than_an_hour_are_fetched_again(
    verifier: OidcVerifier, issuer: LocalIssuer, keys: list[SigningKey], clock: FakeClock
) -> None:
    await verifier.verify(mint(keys[0], claims(issuer, clock)))
    clock.now += 3601
    issuer.publish(keys[2])  # the old key was withdrawn at the issuer
    with pytest.raises(InvalidToken, match="unknown signing key"):
        await verifier.verify(mint(keys[0], claims(issuer, clock)))
    assert issuer.jwks_fetches == 2


async def test_cached_keys_outlive_an_unreachable_issuer(
    tls: TlsFiles, keys: list[SigningKey], clock: FakeClock
) -> None:
    gen = running_issuer(tls, keys[:1])
    issuer = next(gen)
    async with OidcVerifier([rule_for(issuer, tls)], clock=clock) as v:
        await v.verify(mint(keys[0], claims(issuer, clock)))
        gen.close()  # the issuer goes away
        clock.now += 3601
        assert (await v.verify(mint(keys[0], claims(issuer, clock)))).repository == REPO
        clock.now += 61
        with pytest.raises(IssuerUnavailable):
            await v.verify(mint(keys[1], claims(issuer, clock)))


async def test_refusals_log_kid_iss_sub_and_never_the_token(
    verifier: OidcVerifier,
    issuer: LocalIssuer,
    keys: list[SigningKey],
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = mint(keys[0], claims(issuer, clock, aud="someone-else"))
    with caplog.at_level(logging.DEBUG, logger="bigtent"), pytest.raises(InvalidToken):
        await verifier.verify(token)
    assert keys[0].kid in caplog.text and SUB in caplog.text and issuer.url in caplog.text
    for part in token.split("."):
        assert part not in caplog.text


async def test_malformed_tokens(verifier: OidcVerifier) -> None:
    for token in ("", "not a jwt", "a.b.c", "x" * 20_000):
        with pytest.raises(InvalidToken, match="malformed"):
            await verifier.verify(token)


def test_an_issuer_listed_twice_is_a_config_error(tmp_path: Path) -> None:
    rule = OidcIssuerSection(issuer="https://issuer.example", audiences=["bigtent"])
    with pytest.raises(ConfigError, match="twice"):
        OidcVerifier([rule, rule])
    bad = rule.model_copy(update={"ca_file": tmp_path / "missing.pem"})
    with pytest.raises(ConfigError, match="ca_file"):
        OidcVerifier([bad])
