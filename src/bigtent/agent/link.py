"""The agent's link to the runner: sessions opened with a fresh credential, and what happens
when one ends. A persistent agent reconnects with backoff until it is stopped
(``reconnecting``); an ephemeral one has one session only (``once``). Either ends with the
process's exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from bigtent.agent.connection import Connection, Connector, Disconnected, agent_ws_url
from bigtent.agent.credentials import CredentialSource
from bigtent.backoff import Backoff
from bigtent.errors import AuthError, CredentialUnavailable, ProtocolError, RunnerUnreachable

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_AUTH_REFUSED = AuthError.exit_code
"""Exit status when the runner refuses the agent's credentials at the upgrade (3)."""
EXIT_RUNNER_UNREACHABLE = RunnerUnreachable.exit_code
"""Ephemeral agents: the runner could not be reached, or the session dropped (4)."""
EXIT_PROTOCOL_ERROR = ProtocolError.exit_code
"""Ephemeral agents: the runner refused the registration or broke the protocol (1)."""
RECONNECT_BACKOFF = Backoff(base=0.5, cap=30.0, jitter_low=0.5)
"""Reconnect delay: ``0.5 s · 2^attempt`` capped at 30 s, times a jitter in [0.5, 1)."""

Session = Callable[[Connection], Awaitable[None]]
"""Runs one registered session: returns when the agent should stop, raises when it ends."""


class RunnerLink:
    """Where the runner is, how to open a session there, and with which credential."""

    def __init__(
        self, runner_url: str, connect: Connector, credentials: CredentialSource | None
    ) -> None:
        self.runner_url = runner_url
        self._ws_url = agent_ws_url(runner_url)
        self._connect = connect
        self._credentials = credentials

    async def run(self, session: Session) -> None:
        """Open a session and run ``session`` on it; the connection closes after it."""
        async with self._connect(self._ws_url, await self._headers()) as conn:
            await session(conn)

    async def _headers(self) -> dict[str, str]:
        """The upgrade's headers, with a fresh credential: a CI job's ID token is fetched anew
        for every connect, since the last one may have expired."""
        if self._credentials is None:
            return {}
        token = await self._credentials.credential(fresh=True)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def log_auth_refused(self, exc: AuthError) -> None:
        """One clear line; never the token itself."""
        hint = (
            self._credentials.refusal_hint
            if self._credentials is not None
            else "the runner wants a credential: give an agent token"
        )
        log.error(
            "the runner at %s refused the agent's credentials (%s); %s",
            self.runner_url,
            exc,
            hint,
        )


async def reconnecting(
    link: RunnerLink,
    session: Session,
    *,
    stop: asyncio.Event,
    registrations: Callable[[], int],
    rand: Callable[[], float],
) -> int:
    """A persistent agent's sessions, one after the other with ``RECONNECT_BACKOFF`` between
    them, until ``stop`` is set (0) or the runner refuses the credentials (3). The backoff
    starts over after a session that registered (``registrations`` counts them)."""
    attempt = 0
    while not stop.is_set():
        registered_before = registrations()
        try:
            await link.run(session)
        except CredentialUnavailable as exc:
            log.warning("cannot get the agent's credential: %s", exc)
        except AuthError as exc:
            link.log_auth_refused(exc)
            return EXIT_AUTH_REFUSED
        except (RunnerUnreachable, Disconnected, ProtocolError, TimeoutError) as exc:
            log.warning("session with runner %s ended: %s", link.runner_url, exc)
        if stop.is_set():
            break
        if registrations() != registered_before:
            attempt = 0  # it was registered: a fresh outage starts a fresh backoff
        delay = RECONNECT_BACKOFF.delay(attempt, rand())
        attempt += 1
        log.info("reconnecting in %.1f s (attempt %d)", delay, attempt)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
    log.info("agent stopped")
    return EXIT_OK


async def once(link: RunnerLink, session: Session, *, stop: asyncio.Event) -> int | None:
    """An ephemeral agent's one session: None once it was drained or stopped, else the exit
    status of why it failed."""
    try:
        await link.run(session)
    except CredentialUnavailable as exc:
        log.error("cannot get the agent's credential: %s", exc)
        return EXIT_AUTH_REFUSED
    except AuthError as exc:
        link.log_auth_refused(exc)
        return EXIT_AUTH_REFUSED
    except ProtocolError as exc:
        log.error("session with runner %s failed: %s", link.runner_url, exc)
        return EXIT_PROTOCOL_ERROR
    except (RunnerUnreachable, Disconnected, TimeoutError) as exc:
        log.error(
            "session with runner %s failed: %s; an ephemeral agent does not reconnect",
            link.runner_url,
            exc or "timed out",
        )
        return EXIT_RUNNER_UNREACHABLE
    if not stop.is_set():  # defensive: a session only returns once stopped
        log.error("session with runner %s ended unexpectedly", link.runner_url)
        return EXIT_RUNNER_UNREACHABLE
    return None
