"""Client certificates (mTLS, architecture §6): which names a verified certificate carries, whether
one of them is the agent's, and the uvicorn hook that hands the certificate to the app.

uvicorn does not put the peer certificate into the ASGI scope, so the runner serves WebSockets
with a small subclass of uvicorn's protocol that adds it as ``scope["extensions"]["tls"]``
(the ASGI TLS extension's key) before the app runs. Only certificates that the TLS handshake
verified against ``[runner.tls] client_ca`` ever get there: ``getpeercert()`` returns an empty
dict for anything else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

PeerCert = Mapping[str, Any]
"""A certificate as ``ssl.SSLSocket.getpeercert()`` decodes it."""

TLS_EXTENSION = "tls"
PEER_CERT_KEY = "bigtent.peer_cert"


def certificate_names(cert: PeerCert | None) -> tuple[str, ...]:
    """The names a client certificate stands for: its DNS subject alternative names, else its
    subject's common name(s) (RFC 6125 §6.4.4: the CN only counts without DNS SANs)."""
    if not cert:
        return ()
    sans: Sequence[tuple[str, str]] = cert.get("subjectAltName", ())
    dns = tuple(value for kind, value in sans if kind == "DNS")
    if dns:
        return dns
    subject: Sequence[Sequence[tuple[str, str]]] = cert.get("subject", ())
    return tuple(value for rdn in subject for key, value in rdn if key == "commonName")


def name_is_pinned(cert: PeerCert | None, agent_name: str, ephemeral: bool) -> bool:
    """Whether the certificate names the agent (``pin_client_name``). Names compare exactly
    (no wildcards, no case folding: an agent name is not a host name). An ephemeral agent's
    name is its base name plus a generated suffix (``<base>-<8 hex>``), so for it the
    certificate must name the base."""
    for name in certificate_names(cert):
        if not name:
            continue
        if agent_name == name or (ephemeral and agent_name.startswith(name + "-")):
            return True
    return False


def peer_cert(scope: Mapping[str, Any]) -> PeerCert | None:
    """The verified client certificate of a connection, if the client presented one."""
    ext: Mapping[str, Any] = scope.get("extensions") or {}
    tls: Mapping[str, Any] = ext.get(TLS_EXTENSION) or {}
    cert: PeerCert | None = tls.get(PEER_CERT_KEY)
    return cert or None


class CertWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, plus the verified client certificate in the
    scope, and quiet about refusals: after a denial response (``send_denial_response``, how
    the runner refuses an agent's credential) uvicorn still counts the handshake as pending
    and logs "ASGI callable returned without completing handshake." at ERROR, as for a broken
    app. The refusal was answered and logged as one line; marking it complete here keeps it
    that way (uvicorn sends nothing more either way)."""

    async def send(self, message: Any) -> None:
        await super().send(message)
        if (
            message["type"] == "websocket.http.response.body"
            and not message.get("more_body", False)
            and self.initial_response is not None
        ):
            self.handshake_complete = True

    async def run_asgi(self) -> None:
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            cert = ssl_object.getpeercert()
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions[TLS_EXTENSION] = {PEER_CERT_KEY: cert or None}
        await super().run_asgi()
