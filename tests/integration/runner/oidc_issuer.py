"""A local OIDC issuer for tests: loopback HTTPS with a throwaway CA, a discovery document and
a JWKS, counting fetches and able to rotate keys; plus RS256 token minting and forging."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import ssl
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from jwt.algorithms import RSAAlgorithm


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_tls(directory: Path) -> TlsFiles:
    """A test CA and a server certificate for 127.0.0.1 and localhost, signed by it."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bigtent test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey

    @classmethod
    def generate(cls, kid: str) -> SigningKey:
        return cls(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def jwk(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        return data | {"kid": self.kid, "use": "sig", "alg": "RS256"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@dataclass
class IssuerState:
    """What the issuer serves and what it has seen (guarded by ``lock``)."""

    keys: list[SigningKey]
    discovery_issuer: str | None = None
    """Overrides the discovery document's ``issuer``."""
    jwks_uri: str | None = None
    """Overrides the discovery document's ``jwks_uri``."""
    jwks_fetches: int = 0
    discovery_fetches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class LocalIssuer:
    """An OIDC issuer at ``https://127.0.0.1:PORT`` (a thread; stop() when done)."""

    def __init__(self, tls: TlsFiles, keys: list[SigningKey]) -> None:
        self.state = IssuerState(keys=list(keys))
        state = self.state
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host = outer.url
                with state.lock:
                    if self.path == "/.well-known/openid-configuration":
                        state.discovery_fetches += 1
                        body: dict[str, Any] = {
                            "issuer": state.discovery_issuer or host,
                            "jwks_uri": state.jwks_uri or f"{host}/.well-known/jwks",
                            "id_token_signing_alg_values_supported": ["RS256"],
                        }
                    elif self.path in ("/.well-known/jwks", "/keys"):
                        state.jwks_fetches += 1
                        body = {"keys": [k.jwk() for k in state.keys]}
                    else:
                        self.send_error(404)
                        return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def jwks_fetches(self) -> int:
        with self.state.lock:
            return self.state.jwks_fetches

    @property
    def discovery_fetches(self) -> int:
        with self.state.lock:
            return self.state.discovery_fetches

    def publish(self, *keys: SigningKey) -> None:
        """Serve exactly these keys from now on (a rotation)."""
        with self.state.lock:
            self.state.keys = list(keys)


@dataclass
class FakeClock:
    now: float

    def __call__(self) -> float:
        return self.now


def mint(key: SigningKey, claims: dict[str, Any], *, kid: str | None = "same") -> str:
    """An RS256 token signed by ``key``; ``kid="same"`` names the key, None leaves it out."""
    headers = {} if kid is None else {"kid": key.kid if kid == "same" else kid}
    return jwt.encode(claims, key.private, algorithm="RS256", headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A token PyJWT would refuse to make: ``alg: none`` (secret None) or HS256 with ``secret``."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def running_issuer(tls: TlsFiles, keys: list[SigningKey]) -> Generator[LocalIssuer, None, None]:
    issuer = LocalIssuer(tls, keys)
    try:
        yield issuer
    finally:
        issuer.stop()


# ---- fixtures (a pytest plugin: tests/conftest.py) ---------------------------------------------
@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A test CA and the issuer's (and a runner's) certificate, per test module."""
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """The issuer's signing key, per test module."""
    return SigningKey.generate("test-key")


@pytest.fixture
def issuer(tls: TlsFiles, key: SigningKey) -> Iterator[LocalIssuer]:
    """A running loopback issuer serving ``key``."""
    yield from running_issuer(tls, [key])
