"""``ForgeReporter``: the :class:`~bigtent.runner.forge.model.Reporter` that tells GitHub and
Forgejo/Gitea (docs/ci.md, "Reporting to the forge").

``report`` turns the evaluation's report into the checks the forge should show
(``reporting.wanted_checks``) and stores them in the outbox (``forge_outbox``) before it
returns; a background loop sends what changed since the forge was last told. So a final status
stored before a runner stops is sent by the next runner that starts on the database, and a
burst of reports about one evaluation is one round of calls.

Sending: the rows due, soonest first, one at a time (GitHub asks integrators not to call in
parallel). A row is claimed first (runners sharing a PostgreSQL database send each row once),
then its changed checks are sent in order: the summary, then the failed jobs. A failed call
stops the round: the row is tried again after ``leases.next_retry_at``'s capped, jittered
backoff, or after what the forge asked (``Retry-After``, a rate limit's reset); a rate limit
also pauses every row on the same API until then. A check the forge refuses for good (422,
404, …) is logged and not sent again until it changes. A row that has failed for
``give_up_after_secs`` is given up (logged; a new report of the evaluation revives it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from bigtent.config.forge import ForgeKind, ForgeSection, ForgeTarget
from bigtent.errors import ConfigError, ForgeFailed
from bigtent.runner.db import queries
from bigtent.runner.forge.forgejo import ForgejoStatuses
from bigtent.runner.forge.github import GithubApp
from bigtent.runner.forge.model import EvalReport
from bigtent.runner.forge.reporting import (
    Check,
    Sent,
    changed,
    commit_status,
    is_final,
    needs_new_run,
    plan_round,
    sent_as,
    wanted_checks,
)
from bigtent.runner.metrics import Metrics
from bigtent.runner.scheduler.leases import next_retry_at

log = logging.getLogger(__name__)

CLAIM_SECS = 120.0
"""A claimed row is another runner's again this long after the claim (a runner that died)."""
BATCH = 50
"""Rows looked at per pass."""
IDLE_WAIT_SECS = 30.0
"""With nothing due, the loop looks again after this long (a report wakes it sooner)."""
BUSY_WAIT_SECS = 1.0
"""Due rows another runner holds: look again after this long."""
ERROR_PAUSE_SECS = 5.0
PRUNE_EVERY_SECS = 600.0
MAX_ERROR_CHARS = 2000


def target_json(target: ForgeTarget) -> str:
    return json.dumps(asdict(target), sort_keys=True)


def target_from_json(text: str) -> ForgeTarget:
    doc = json.loads(text)
    doc["kind"] = ForgeKind(doc["kind"])
    return ForgeTarget(**doc)


def checks_json(checks: tuple[Check, ...] | list[Check]) -> str:
    return json.dumps([c.to_json() for c in checks], sort_keys=True)


def sent_json(sent: dict[str, Sent]) -> str:
    return json.dumps({name: s.to_json() for name, s in sent.items()}, sort_keys=True)


def parse_sent(text: str) -> dict[str, Sent]:
    return {name: Sent.from_json(doc) for name, doc in json.loads(text).items()}


class ForgeReporter:
    """Stores reports in the outbox and sends them to the forges from a background loop
    (``start``/``stop``)."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: ForgeSection | None = None,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        runner_id: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics if metrics is not None else Metrics()
        self.settings = settings if settings is not None else ForgeSection()
        self.clock = clock
        self.rand = rand
        self.runner_id = runner_id or f"forge-{secrets.token_hex(6)}"
        self._github: dict[tuple[str, int, str, str | None], GithubApp] = {}
        self._forgejo: dict[tuple[str, str, str | None], ForgejoStatuses] = {}
        self._paused: dict[str, float] = {}
        """API URL → until when a rate limit pauses every call to it."""
        self._unsaved: dict[int, EvalReport] = {}
        """Reports the database did not take (an outage): stored by the loop."""
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_prune = 0.0
        self.calls = 0
        """Calls to forges that ended, sent or refused for good (for tests and logs)."""

    # ---- Reporter ---------------------------------------------------------------------------
    async def report(self, report: EvalReport) -> None:
        """Store what the forge should show for ``report``'s evaluation; the loop sends it.
        Never raises: a database error keeps the report in memory for the loop."""
        try:
            await self._store(report)
        except SQLAlchemyError as exc:
            log.warning(
                "forge: cannot store the report of evaluation %d (%s); trying again",
                report.evaluation_id,
                type(exc).__name__,
            )
            self._unsaved[report.evaluation_id] = report
        except Exception:
            log.exception("forge: cannot store the report of evaluation %d", report.evaluation_id)
            return
        self._wake.set()

    async def _store(self, report: EvalReport) -> None:
        s = self.settings
        async with self._lock, self.engine.begin() as conn:
            row = await queries.fetch_forge_outbox(conn, report.evaluation_id)
            # A job whose check the forge has, or was going to get, keeps it.
            existing: set[str] = set()
            if row is not None:
                existing.update(parse_sent(row.forge_sent))
                existing.update(doc["name"] for doc in json.loads(row.forge_wanted))
            wanted = checks_json(
                wanted_checks(
                    report,
                    existing,
                    max_job_checks=s.max_job_checks,
                    log_tail_chars=s.log_tail_chars,
                )
            )
            target = target_json(report.target)
            if (
                row is not None
                and row.forge_wanted == wanted
                and row.forge_target == target
                and not row.gave_up
            ):
                return  # nothing the forge would show differently
            await queries.store_forge_wanted(
                conn,
                report.evaluation_id,
                project=report.project,
                kind=str(report.target.kind),
                target=target,
                commit_sha=report.commit_sha,
                wanted=wanted,
                final=is_final(report.state),
                now=self.clock(),
            )
        self._unsaved.pop(report.evaluation_id, None)

    async def delivery(self, evaluation_id: int) -> dict[str, Any] | None:
        """Where the report of an evaluation stands (for the API and the dashboard): pending
        or sent, the last failure and when the next attempt is due, and each check as the
        forge was last told (status, conclusion, GitHub check run id). None: never reported."""
        async with self.engine.connect() as conn:
            row = await queries.fetch_forge_outbox(conn, evaluation_id)
        if row is None:
            return None
        sent = parse_sent(row.forge_sent)
        return {
            "forge": row.forge_kind,
            "pending": bool(row.pending),
            "gave_up": bool(row.gave_up),
            "attempts": int(row.attempts),
            "last_error": row.last_error,
            "next_attempt_at": float(row.next_attempt_at) if row.pending else None,
            "last_sent_at": row.last_sent_at,
            "checks": {
                name: {
                    "status": str(s.status),
                    "conclusion": str(s.conclusion) if s.conclusion is not None else None,
                    "check_run_id": s.run_id,
                }
                for name, s in sorted(sent.items())
            },
        }

    # ---- the loop ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="forge-reporter")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(SQLAlchemyError):
            async with self.engine.begin() as conn:
                await queries.release_forge_claims(conn, self.runner_id)
        for app in self._github.values():
            await app.aclose()
        for statuses in self._forgejo.values():
            await statuses.aclose()
        self._github.clear()
        self._forgejo.clear()

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                wait = await self.pass_once()
            except Exception:
                log.exception(
                    "forge: reporting pass failed; trying again in %.0f s", ERROR_PAUSE_SECS
                )
                wait = ERROR_PAUSE_SECS
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # that arrives with the wake-up, and stop() would wait for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def pass_once(self) -> float:
        """Store unsaved reports, send every due row, prune now and then; how long until the
        next pass is due."""
        for report in list(self._unsaved.values()):
            await self._store(report)
        now = self.clock()
        if now - self._last_prune >= PRUNE_EVERY_SECS:
            self._last_prune = now
            async with self.engine.begin() as conn:
                pruned = await queries.prune_forge_outbox(conn, now - self.settings.keep_secs)
            if pruned:
                log.info(
                    "forge: forgot %d reports sent more than %.0f s ago",
                    pruned,
                    self.settings.keep_secs,
                )
        async with self.engine.connect() as conn:
            rows = await queries.due_forge_outbox(conn, now, self.runner_id, BATCH)
        for row in rows:
            await self._send_row(int(row.evaluation_id))
        async with self.engine.connect() as conn:
            next_at = await queries.next_forge_attempt_at(conn)
        if self._unsaved:
            return ERROR_PAUSE_SECS
        if next_at is None:
            return IDLE_WAIT_SECS
        wait = next_at - self.clock()
        if wait <= 0:
            # due but held by another runner (or a full batch): look again soon
            return 0.0 if len(rows) >= BATCH else BUSY_WAIT_SECS
        return min(wait, IDLE_WAIT_SECS)

    async def _send_row(self, evaluation_id: int) -> None:
        now = self.clock()
        async with self.engine.begin() as conn:
            if not await queries.claim_forge_outbox(
                conn, evaluation_id, self.runner_id, now + CLAIM_SECS, now
            ):
                return
            row = await queries.fetch_forge_outbox(conn, evaluation_id)
        if row is None or not row.pending or row.gave_up:
            async with self.engine.begin() as conn:
                await queries.update_forge_outbox(
                    conn, evaluation_id, claimed_by=None, claimed_until=None
                )
            return
        kind = ForgeKind(row.forge_kind)
        target = target_from_json(row.forge_target)
        wanted = [Check.from_json(doc) for doc in json.loads(row.forge_wanted)]
        sent = parse_sent(row.forge_sent)
        seen = int(row.wanted_seq)
        todo = changed(kind, wanted, sent)
        if not todo:
            async with self.engine.begin() as conn:
                if not await queries.settle_forge_outbox(conn, evaluation_id, seen):
                    # a newer version came meanwhile: let go, it is due again at once
                    await queries.update_forge_outbox(
                        conn, evaluation_id, claimed_by=None, claimed_until=None
                    )
            return
        send, rest_at = plan_round(
            todo, sent, row.last_sent_at, self.settings.min_update_interval_secs, now
        )
        paused = self._paused.get(target.api_url, 0.0)
        if paused > now or not send:
            async with self.engine.begin() as conn:
                await queries.update_forge_outbox(
                    conn,
                    evaluation_id,
                    next_attempt_at=paused if paused > now else (rest_at or now),
                    claimed_by=None,
                    claimed_until=None,
                )
            return
        try:
            for check in send:
                prior = sent.get(check.name)
                try:
                    sent[check.name] = await self._send_check(
                        kind, target, row.commit_sha, check, prior
                    )
                except ForgeFailed as exc:
                    if not exc.permanent:
                        outcome = "rate_limited" if exc.rate_limited else "failed"
                        self.metrics.forge_call(kind, outcome)
                        raise
                    self.metrics.forge_call(kind, "refused")
                    log.warning(
                        "forge: %s refused %s of evaluation %d for good: %s (sent again only "
                        "when it changes)",
                        target.api_url,
                        check.name,
                        evaluation_id,
                        exc,
                    )
                    run_id = prior.run_id if prior is not None else None
                    sent[check.name] = sent_as(kind, check, run_id)
                else:
                    self.metrics.forge_call(kind, "sent")
                self.calls += 1
                if prior is None or prior.run_id != sent[check.name].run_id:
                    # a new check run's id is kept at once: a restart updates it, never
                    # creates a second one
                    async with self.engine.begin() as conn:
                        await queries.update_forge_outbox(
                            conn, evaluation_id, forge_sent=sent_json(sent)
                        )
        except ForgeFailed as exc:
            await self._failed(row, sent, exc, target)
            return
        now = self.clock()
        done: dict[str, Any] = {"next_attempt_at": now}
        if rest_at is None:
            done["last_sent_at"] = now  # a full round: the interval starts again
        else:
            done["next_attempt_at"] = rest_at  # text-only changes wait for the interval
        async with self.engine.begin() as conn:
            await queries.update_forge_outbox(
                conn,
                evaluation_id,
                forge_sent=sent_json(sent),
                attempts=0,
                first_failure_at=None,
                last_error=None,
                updated_at=now,
                claimed_by=None,
                claimed_until=None,
                **done,
            )
            settled = rest_at is None and await queries.settle_forge_outbox(
                conn, evaluation_id, seen
            )
        if not settled and rest_at is None:
            self._wake.set()  # a newer report came in meanwhile

    async def _failed(
        self, row: Any, sent: dict[str, Sent], exc: ForgeFailed, target: ForgeTarget
    ) -> None:
        s = self.settings
        now = self.clock()
        attempts = int(row.attempts) + 1
        first = float(row.first_failure_at) if row.first_failure_at is not None else now
        at = next_retry_at(attempts, now, s.retry_base_secs, s.retry_max_secs, self.rand())
        if exc.retry_after_secs is not None:
            at = max(at, now + exc.retry_after_secs)
        if exc.rate_limited:
            self._paused[target.api_url] = max(self._paused.get(target.api_url, 0.0), at)
        gave_up = now - first >= s.give_up_after_secs
        if gave_up:
            log.error(
                "forge: giving up on the report of evaluation %d to %s after %d attempts: %s",
                row.evaluation_id,
                target.repository,
                attempts,
                exc,
            )
        else:
            log.warning(
                "forge: reporting evaluation %d to %s failed (attempt %d, next in %.0f s): %s",
                row.evaluation_id,
                target.repository,
                attempts,
                at - now,
                exc,
            )
        async with self.engine.begin() as conn:
            await queries.update_forge_outbox(
                conn,
                int(row.evaluation_id),
                forge_sent=sent_json(sent),
                attempts=attempts,
                first_failure_at=first,
                last_error=str(exc)[:MAX_ERROR_CHARS],
                next_attempt_at=at,
                gave_up=gave_up,
                updated_at=now,
                claimed_by=None,
                claimed_until=None,
            )

    # ---- one call ---------------------------------------------------------------------------
    async def _send_check(
        self, kind: ForgeKind, target: ForgeTarget, sha: str, check: Check, prior: Sent | None
    ) -> Sent:
        try:
            return await self._send_check_to(kind, target, sha, check, prior)
        except ConfigError as exc:  # a CA file that cannot be loaded
            raise ForgeFailed(str(exc)) from None

    async def _send_check_to(
        self, kind: ForgeKind, target: ForgeTarget, sha: str, check: Check, prior: Sent | None
    ) -> Sent:
        if kind is ForgeKind.GITHUB:
            app = self._github_app(target)
            installation = await app.installation_id(target.repository, target.installation_id)
            if needs_new_run(check, prior):
                run_id = await app.create_check_run(target.repository, installation, sha, check)
            else:
                assert prior is not None and prior.run_id is not None
                run_id = prior.run_id
                await app.update_check_run(target.repository, installation, run_id, check)
            return sent_as(kind, check, run_id)
        statuses = self._forgejo_statuses(target)
        await statuses.set_status(target.repository, sha, commit_status(check))
        return sent_as(kind, check)

    def _github_app(self, target: ForgeTarget) -> GithubApp:
        if target.app_id is None or not target.app_key_file:
            raise ForgeFailed(
                f"project reporting to GitHub ({target.repository}) needs github_app_id and "
                "github_app_key_file"
            )
        key = (target.api_url, target.app_id, target.app_key_file, target.ca_file)
        app = self._github.get(key)
        if app is None:
            app = GithubApp(
                target.api_url,
                target.app_id,
                target.app_key_file,
                ca_file=target.ca_file,
                timeout_secs=self.settings.request_timeout_secs,
                clock=self.clock,
            )
            self._github[key] = app
        return app

    def _forgejo_statuses(self, target: ForgeTarget) -> ForgejoStatuses:
        if not target.token_file:
            raise ForgeFailed(
                f"project reporting to {target.kind} ({target.repository}) needs forge_token_file"
            )
        key = (target.api_url, target.token_file, target.ca_file)
        statuses = self._forgejo.get(key)
        if statuses is None:
            statuses = ForgejoStatuses(
                target.api_url,
                target.token_file,
                ca_file=target.ca_file,
                timeout_secs=self.settings.request_timeout_secs,
                clock=self.clock,
            )
            self._forgejo[key] = statuses
        return statuses
