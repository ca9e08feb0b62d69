"""mTLS on the agent WebSocket under a real uvicorn serving HTTPS (architecture §6): with
``client_ca`` a token agent must present a certificate that CA signed, and with
``pin_client_name`` that certificate must name the agent; Nix and clients reading the cache
need no certificate. Plus the binding of a machine id to the token that registered it."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from bigtent import protocol as p
from bigtent.agent.main import ssl_context_for
from bigtent.config import AgentSection, Role
from bigtent.errors import ConfigError
from tests.integration.runner.conftest import (
    WAIT_SECS,
    MakeRunner,
    RunnerHarness,
    agent_socket,
    receive,
    register_message,
)

SYSTEM = "x86_64-linux"


@dataclass(frozen=True)
class Ca:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey
    cert_file: Path

    @classmethod
    def create(cls, directory: Path, cn: str) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        path = directory / f"{cn.replace(' ', '-')}.crt"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(name, key, path)

    def issue(
        self, directory: Path, stem: str, *, cn: str, dns: list[str], server: bool
    ) -> tuple[Path, Path]:
        """A leaf certificate and key, for a server (127.0.0.1) or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        if server:
            names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file, key_file = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_file, key_file


@dataclass(frozen=True)
class Pki:
    server_ca: Ca
    agents_ca: Ca
    server: tuple[Path, Path]
    directory: Path

    def client(self, cn: str, dns: list[str] | None = None, *, ca: Ca | None = None) -> Any:
        return (ca or self.agents_ca).issue(
            self.directory, f"client-{uuid.uuid4().hex[:8]}", cn=cn, dns=dns or [], server=False
        )

    def context(self, client: tuple[Path, Path] | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.server_ca.cert_file))
        if client is not None:
            ctx.load_cert_chain(str(client[0]), str(client[1]))
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "pki"
    directory.mkdir()
    server_ca = Ca.create(directory, "server CA")
    agents_ca = Ca.create(directory, "agents CA")
    server = server_ca.issue(directory, "server", cn="localhost", dns=["localhost"], server=True)
    return Pki(server_ca, agents_ca, server, directory)


async def mtls_runner(make_runner: MakeRunner, pki: Pki, *, pin: bool) -> RunnerHarness:
    return await make_runner(
        serve=True,
        tls={
            "cert_file": str(pki.server[0]),
            "key_file": str(pki.server[1]),
            "client_ca": str(pki.agents_ca.cert_file),
            "pin_client_name": pin,
        },
    )


def tls_socket(runner: RunnerHarness, pki: Pki, client: tuple[Path, Path] | None) -> connect:
    return connect(
        runner.ws_url,
        additional_headers={"Authorization": f"Bearer {runner.tokens[Role.AGENT]}"},
        open_timeout=WAIT_SECS,
        proxy=None,
        ssl=pki.context(client),
    )


async def register_as(ws: ClientConnection, name: str, **fields: Any) -> p.RunnerMessage:
    await ws.send(p.encode(register_message(SYSTEM, name=name, **fields)))
    return await receive(ws)


async def agent_names(runner: RunnerHarness, pki: Pki) -> list[str]:
    async with httpx.AsyncClient(
        base_url=runner.url or "",
        verify=pki.context(None),
        headers={"Authorization": f"Bearer {runner.tokens[Role.CLIENT]}"},
    ) as client:
        resp = await client.get("/api/v1/agents")
    assert resp.status_code == 200, resp.text
    return [a["name"] for a in resp.json()["agents"]]


async def test_a_certificate_naming_the_agent_registers(make_runner: MakeRunner, pki: Pki) -> None:
    runner = await mtls_runner(make_runner, pki, pin=True)
    async with tls_socket(runner, pki, pki.client("build-01")) as ws:
        assert isinstance(await register_as(ws, "build-01"), p.Registered)
    # A DNS SAN names the agent even when the CN says something else.
    async with tls_socket(runner, pki, pki.client("whatever", ["build-02"])) as ws:
        assert isinstance(await register_as(ws, "build-02"), p.Registered)
    # An ephemeral agent's certificate names its base name.
    async with tls_socket(runner, pki, pki.client("gha")) as ws:
        assert isinstance(await register_as(ws, "gha-0a1b2c3d", ephemeral=True), p.Registered)
    assert sorted(await agent_names(runner, pki)) == ["build-01", "build-02", "gha-0a1b2c3d"]


async def test_the_agents_own_tls_settings_present_its_certificate(
    make_runner: MakeRunner, pki: Pki
) -> None:
    """What `bigtent agent --ca-file --client-cert --client-key` builds is accepted."""
    runner = await mtls_runner(make_runner, pki, pin=True)
    cert_file, key_file = pki.client("build-01")
    section = AgentSection(
        ca_file=pki.server_ca.cert_file, client_cert_file=cert_file, client_key_file=key_file
    )
    ctx = ssl_context_for(section)
    assert ctx is not None
    async with connect(
        runner.ws_url,
        additional_headers={"Authorization": f"Bearer {runner.tokens[Role.AGENT]}"},
        open_timeout=WAIT_SECS,
        proxy=None,
        ssl=ctx,
    ) as ws:
        assert isinstance(await register_as(ws, "build-01"), p.Registered)
    with pytest.raises(ConfigError, match="client_cert_file"):
        ssl_context_for(AgentSection(client_cert_file=key_file, client_key_file=cert_file))
    with pytest.raises(ConfigError, match=r"needs agent\.client_cert_file"):
        ssl_context_for(AgentSection(client_key_file=key_file))


async def test_a_certificate_naming_another_agent_is_refused(
    make_runner: MakeRunner, pki: Pki
) -> None:
    runner = await mtls_runner(make_runner, pki, pin=True)
    async with tls_socket(runner, pki, pki.client("build-01")) as ws:
        answer = await register_as(ws, "build-02")
        assert isinstance(answer, p.Error) and "does not name" in answer.message
        with pytest.raises(ConnectionClosed):
            await receive(ws)
    # The CN does not count next to DNS names.
    async with tls_socket(runner, pki, pki.client("build-03", ["b3"])) as ws:
        answer = await register_as(ws, "build-03")
        assert isinstance(answer, p.Error) and "does not name" in answer.message
    assert await agent_names(runner, pki) == []


async def test_an_agent_without_a_certificate_is_refused_before_the_upgrade(
    make_runner: MakeRunner, pki: Pki
) -> None:
    runner = await mtls_runner(make_runner, pki, pin=False)
    with pytest.raises(InvalidStatus) as info:
        async with tls_socket(runner, pki, None):
            pass
    assert info.value.response.status_code == 403
    assert b"client certificate is required" in info.value.response.body
    # Without pinning any certificate of the agents' CA will do.
    async with tls_socket(runner, pki, pki.client("build-01")) as ws:
        assert isinstance(await register_as(ws, "some-other-name"), p.Registered)


async def test_a_certificate_of_another_ca_fails_the_handshake(
    make_runner: MakeRunner, pki: Pki
) -> None:
    runner = await mtls_runner(make_runner, pki, pin=True)
    rogue = pki.client("build-01", ca=pki.server_ca)  # trusted for servers, not for agents
    # TLS 1.3: the client may finish its side before the server refuses the certificate, so
    # the failure shows as a dropped connection during the WebSocket handshake.
    with pytest.raises((ssl.SSLError, OSError, InvalidHandshake, ConnectionClosed)):
        async with tls_socket(runner, pki, rogue) as ws:
            await register_as(ws, "build-01")
    assert await agent_names(runner, pki) == []


async def test_the_cache_needs_no_client_certificate(make_runner: MakeRunner, pki: Pki) -> None:
    runner = await mtls_runner(make_runner, pki, pin=True)
    async with httpx.AsyncClient(base_url=runner.url or "", verify=pki.context(None)) as client:
        resp = await client.get("/cache/nix-cache-info")
    assert resp.status_code == 200
    assert "StoreDir: /nix/store" in resp.text


# ---- machine ids are bound to the token that registered them ------------------------------------
async def stored_agent_token(runner: RunnerHarness, name: str) -> str:
    resp = await runner.client(Role.ADMIN).post(
        "/api/v1/tokens", json={"role": "agent", "name": name}
    )
    assert resp.status_code == 201, resp.text
    secret: str = resp.json()["token"]
    return secret


def token_socket(runner: RunnerHarness, token: str) -> connect:
    return connect(
        runner.ws_url,
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=WAIT_SECS,
        proxy=None,
    )


async def test_another_token_cannot_take_a_machine_id_until_the_first_is_revoked(
    make_runner: MakeRunner,
) -> None:
    runner = await make_runner(serve=True)
    machine_id = uuid.uuid4().hex
    first = await stored_agent_token(runner, "first")
    second = await stored_agent_token(runner, "second")
    async with token_socket(runner, first) as ws:
        assert isinstance(await register_as(ws, "a", machine_id=machine_id), p.Registered)
    # Live or gone, the machine id stays bound to "first" while that token is valid.
    for _ in range(2):
        async with token_socket(runner, second) as ws:
            answer = await register_as(ws, "a", machine_id=machine_id)
            assert isinstance(answer, p.Error) and "in use" in answer.message
    async with token_socket(runner, first) as ws:
        assert isinstance(await register_as(ws, "a", machine_id=machine_id), p.Registered)
        async with token_socket(runner, second) as intruder:
            answer = await register_as(intruder, "a", machine_id=machine_id)
            assert isinstance(answer, p.Error) and "in use" in answer.message
        # The first session survived the attempt.
        assert runner.comps.sessions.live[machine_id].principal is not None
        assert runner.comps.sessions.live[machine_id].principal.name == "first"  # type: ignore[union-attr]
    # Rotation: once "first" is revoked, "second" may take the machine id over.
    revoked = await runner.client(Role.ADMIN).delete("/api/v1/tokens/first")
    assert revoked.status_code == 200
    async with token_socket(runner, second) as ws:
        assert isinstance(await register_as(ws, "a", machine_id=machine_id), p.Registered)
    async with token_socket(runner, runner.tokens[Role.AGENT]) as ws:
        answer = await register_as(ws, "a", machine_id=machine_id)
        assert isinstance(answer, p.Error) and "in use" in answer.message


async def test_the_same_token_reconnects_to_its_machine_id(make_runner: MakeRunner) -> None:
    runner = await make_runner(serve=True)
    machine_id = uuid.uuid4().hex
    for _ in range(2):
        async with agent_socket(runner) as ws:
            assert isinstance(await register_as(ws, "a", machine_id=machine_id), p.Registered)
