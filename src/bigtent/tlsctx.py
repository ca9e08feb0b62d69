"""TLS contexts, one place: a CA file (a PEM bundle) -> an ``ssl.SSLContext``.

Every client bigtent opens to a service with a private CA goes through here: the ``bigtent``
client and the agent to the runner (``--ca-file``, ``agent.ca_file``), the runner to an OIDC
issuer (``[[auth.oidc]] ca_file``), to GitHub for the autoscaler (``api_ca_file``) and to a
project's forge (``forge_ca_file``). A CA file replaces the system roots; without one the
system roots apply. A file that cannot be loaded is a ``ConfigError`` naming what it is for:
``cannot load WHAT PATH: REASON``.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path

from bigtent.errors import ConfigError


def ca_context(ca_file: Path | str | None, what: str) -> ssl.SSLContext:
    """A verifying client context trusting only ``ca_file``'s CAs, or the system roots when
    ``ca_file`` is None (hostname checked, TLS 1.2 or later: ``ssl.create_default_context``)."""
    try:
        return ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load {what} {ca_file}: {exc}") from exc


def httpx_verify(ca_file: Path | str | None, what: str) -> ssl.SSLContext | bool:
    """httpx's ``verify``: ``True`` (its own system roots) without a CA file, else the
    context of ``ca_context``."""
    return True if ca_file is None else ca_context(ca_file, what)


def httpx_verify_for(
    urls: Sequence[str], ca_file: Path | str | None, what: str, environ: Mapping[str, str]
) -> ssl.SSLContext | bool:
    """httpx's ``verify`` for a client of ``urls`` with an optional CA file: ``httpx_verify``'s,
    except when every URL is plain ``http://``, there is no CA file and no ``https://`` proxy
    in ``environ``: then a verifying context that trusts no CA. httpx loads its CA bundle for
    each client it makes (tens of milliseconds of a short command's start); such a client
    makes no TLS connection, and one it made would fail verification, never go unchecked."""
    if _plain_http(urls, ca_file, environ):
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return httpx_verify(ca_file, what)


def _plain_http(
    urls: Sequence[str], ca_file: Path | str | None, environ: Mapping[str, str]
) -> bool:
    """Whether a client of ``urls`` makes no TLS connection: every URL ``http://``, no CA
    file, no ``https://`` proxy in ``environ`` (pure)."""
    if ca_file is not None or not urls or not all(u.startswith("http://") for u in urls):
        return False
    return not any(
        name.lower().endswith("_proxy") and value.strip().lower().startswith("https://")
        for name, value in environ.items()
    )
