"""The database schema as SQLAlchemy Core tables (migrations in ``migrations/versions``).

Times are UTC seconds since the epoch (floats), portable across SQLite and PostgreSQL. Lists
of store paths and features are stored as JSON text. States are the ``StrEnum`` values.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    true,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

builds = Table(
    "builds",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("state", String(32), nullable=False),
    Column("priority", Integer, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("created_by", String(256), nullable=False, default=""),
    Column("repository", String(256)),
    Column("ref", String(256)),
    Column("trusted", Boolean, nullable=False, default=True),
    # The client's key for one submission (migration 0011): a retried ``POST /builds`` with
    # the same key and token finds this build again instead of creating another.
    Column("submission_key", String(64)),
)
Index("ix_builds_state", builds.c.state)
Index("ix_builds_submission_key", builds.c.submission_key)

build_events = Table(
    # A build's history (migration 0011, docs/api.md "Build events"): who cancelled, bumped
    # or restarted it and when, written in the transaction of the action; and what the runner
    # did on its own (an interrupted admission). ``actor`` is the token's name, or
    # ``runner`` for the runner itself.
    "build_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("build_id", Integer, ForeignKey("builds.id", ondelete="CASCADE"), nullable=False),
    Column("at", Float, nullable=False),
    Column("kind", String(32), nullable=False),  # BuildEventKind
    Column("actor", String(256), nullable=False),
    Column("detail", Text),
)
Index("ix_build_events_build_id", build_events.c.build_id)

derivations = Table(
    "derivations",
    metadata,
    Column("drv_path", String(256), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("system", String(64), nullable=False),
    Column("required_features", Text, nullable=False),  # JSON list, sorted
    Column("outputs", Text, nullable=False),  # JSON {name: path}
    Column("input_drvs", Text, nullable=False),  # JSON {drv path: [output names]}
    Column("input_srcs", Text, nullable=False),  # JSON list
    # Hex sha256 of Nix's hashDerivationModulo (what stands for this .drv in its dependents'
    # output paths); NULL for rows recorded before migration 0002.
    Column("hash_modulo", String(64)),
    # The .drv's ATerm text, sent with its steps' assignments when small enough; NULL for rows
    # recorded before migration 0016 and for texts longer than protocol.MAX_ASSIGN_DRV_BYTES.
    Column("text", Text),
)

steps = Table(
    "steps",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("drv_path", String(256), ForeignKey("derivations.drv_path"), nullable=False),
    Column("state", String(32), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("not_before", Float),
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_id", String(64)),
    Column("lease_expires_at", Float),
    Column("agent_machine_id", String(256)),
    Column("agent_name", String(256)),
    Column("assigned_at", Float),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("outcome", String(32)),
    Column("exit_code", Integer),
    Column("error", Text),
    Column("prepare_secs", Float),
    Column("build_secs", Float),
    Column("upload_secs", Float),
    # When the derivation last failed as a build failure (the failure cache, migration 0003);
    # NULL: nothing cached.
    Column("failed_at", Float),
    # A trusted step runs on trusted venues and publishes to the main cache; an untrusted one
    # runs on untrusted venues and publishes to the untrusted cache (migration 0006). One
    # derivation has at most one step of each trust.
    Column("trusted", Boolean, nullable=False, default=True, server_default=true()),
    UniqueConstraint("drv_path", "trusted", name="uq_steps_drv_path_trusted"),
)
Index("ix_steps_state", steps.c.state)

step_attempts = Table(
    # One row per attempt of a step (migration 0010, docs/api.md "Attempts"), written in the
    # transaction that ends the attempt: the venue that ran it, when, how it ended, why, and
    # when the step will be tried again (NULL: the outcome was final).
    "step_attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("step_id", Integer, ForeignKey("steps.id", ondelete="CASCADE"), nullable=False),
    # Which of the step's infrastructure attempts this was (1 for the first): only an
    # infrastructure failure advances the count (a success, build failure or abort does not).
    Column("attempt", Integer, nullable=False),
    # ``scheduler.max_infra_attempts`` when the attempt ended.
    Column("max_attempts", Integer, nullable=False),
    Column("agent_machine_id", String(256)),
    Column("agent_name", String(256)),
    Column("started_at", Float),
    Column("finished_at", Float, nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("error", Text),
    Column("retry_at", Float),
)
Index("ix_step_attempts_step_id", step_attempts.c.step_id)

cached_failure_hits = Table(
    # A build that failed a step at once from the failure cache (migration 0013,
    # docs/dashboard.md): recorded for that build, never written over the step's own record
    # (error, timings, agent), which stays the attempt that really ran. ``attempt_id`` is that
    # attempt (NULL when it has no record: it ended before migration 0010, or was deleted);
    # ``failed_at``/``failed_outcome`` the failure that was cached, ``cached_until`` when it
    # stops being reused.
    "cached_failure_hits",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("build_id", Integer, ForeignKey("builds.id", ondelete="CASCADE"), nullable=False),
    Column("step_id", Integer, ForeignKey("steps.id", ondelete="CASCADE"), nullable=False),
    Column("attempt_id", Integer, ForeignKey("step_attempts.id", ondelete="SET NULL")),
    Column("hit_at", Float, nullable=False),
    Column("failed_at", Float, nullable=False),
    Column("failed_outcome", String(32), nullable=False),
    Column("cached_until", Float, nullable=False),
)
Index("ix_cached_failure_hits_build_id", cached_failure_hits.c.build_id)
Index("ix_cached_failure_hits_step_id", cached_failure_hits.c.step_id)

step_deps = Table(
    "step_deps",
    metadata,
    Column("step_id", Integer, ForeignKey("steps.id", ondelete="CASCADE"), primary_key=True),
    Column("dep_id", Integer, ForeignKey("steps.id", ondelete="CASCADE"), primary_key=True),
)
Index("ix_step_deps_dep_id", step_deps.c.dep_id)

build_steps = Table(
    "build_steps",
    metadata,
    Column("build_id", Integer, ForeignKey("builds.id", ondelete="CASCADE"), primary_key=True),
    Column("step_id", Integer, ForeignKey("steps.id", ondelete="CASCADE"), primary_key=True),
)
Index("ix_build_steps_step_id", build_steps.c.step_id)

build_roots = Table(
    "build_roots",
    metadata,
    Column("build_id", Integer, ForeignKey("builds.id", ondelete="CASCADE"), primary_key=True),
    Column("drv_path", String(256), primary_key=True),
    Column("step_id", Integer, ForeignKey("steps.id")),
)


def _store_path_columns() -> list[Column[object]]:
    return [
        Column("path", String(256), primary_key=True),
        Column("hash_part", String(32), nullable=False, unique=True),
        Column("nar_hash", String(128), nullable=False),
        Column("nar_size", BigInteger, nullable=False),
        Column("url", String(256), nullable=False),
        Column("compression", String(16), nullable=False),
        Column("file_hash", String(128), nullable=False),
        Column("file_size", BigInteger, nullable=False),
        Column("references", Text, nullable=False),  # JSON list of basenames, sorted
        Column("deriver", String(256)),
        Column("ca", String(256)),
        Column("sig", Text, nullable=False),
        Column("created_at", Float, nullable=False),
        # When the path was last asked for (narinfo or NAR), flushed in batches by
        # ``retention.usage`` (migration 0015); NULL: never since it was published.
        Column("last_used_at", Float),
    ]


store_paths = Table("store_paths", metadata, *_store_path_columns())
Index("ix_store_paths_url", store_paths.c.url)
# What a collection's sweep reads again before each batch: paths published or used since.
Index("ix_store_paths_created_at", store_paths.c.created_at)
Index("ix_store_paths_last_used_at", store_paths.c.last_used_at)

untrusted_store_paths = Table(
    # The untrusted cache's index (``/cache/untrusted``, migration 0006): outputs of untrusted
    # steps, signed with the untrusted key. A table of its own, so no query of the main cache
    # can ever see these rows. NAR files share the storage (named by their file hash).
    "untrusted_store_paths",
    metadata,
    *_store_path_columns(),
)
Index("ix_untrusted_store_paths_url", untrusted_store_paths.c.url)
Index("ix_untrusted_store_paths_created_at", untrusted_store_paths.c.created_at)
Index("ix_untrusted_store_paths_last_used_at", untrusted_store_paths.c.last_used_at)

cache_pins = Table(
    # Named pins (migration 0015, docs/cache.md): each keeps its paths' closures in the cache
    # until it is removed or, with ``expires_at``, until then.
    "cache_pins",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("paths", Text, nullable=False),  # JSON list of store paths, sorted
    Column("created_at", Float, nullable=False),
    Column("created_by", String(256), nullable=False, default=""),
    Column("expires_at", Float),
)

cache_gc_doomed = Table(
    # NAR files whose narinfos a collection deleted (migration 0015): written in the
    # transaction that deletes the rows, removed once the file is (or is in use again), so a
    # runner killed mid-sweep finishes the job at its next collection.
    "cache_gc_doomed",
    metadata,
    Column("url", String(256), primary_key=True),
    Column("doomed_at", Float, nullable=False),
)

cache_gc_runs = Table(
    # One row per collection (migration 0015): ``bigtent gc`` and the metrics' "last
    # collection" read it; ``summary`` is the run's JSON report.
    "cache_gc_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float, nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("paths_deleted", Integer, nullable=False),
    Column("bytes_freed", BigInteger, nullable=False),
    Column("summary", Text, nullable=False),
)

agents = Table(
    "agents",
    metadata,
    Column("machine_id", String(256), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("hostname", String(256), nullable=False, default=""),
    Column("systems", Text, nullable=False),
    Column("supported_features", Text, nullable=False),
    Column("mandatory_features", Text, nullable=False),
    Column("max_jobs", Integer, nullable=False),
    Column("speed_factor", Float, nullable=False, default=1.0),
    Column("ephemeral", Boolean, nullable=False, default=False),
    Column("auth_kind", String(16), nullable=False, default="token"),
    Column("launch_id", String(256)),
    Column("version", String(64), nullable=False, default=""),
    Column("connected", Boolean, nullable=False, default=False),
    Column("first_seen", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("steps_succeeded", Integer, nullable=False, default=0),
    Column("steps_failed", Integer, nullable=False, default=0),
    Column("infra_failures", Integer, nullable=False, default=0),
    Column("backoff_until", Float),
    # Consecutive infrastructure failures: with backoff_until, restored when the agent
    # reconnects (migration 0003).
    Column("consecutive_failures", Integer, nullable=False, default=0, server_default="0"),
    # The identity of an OIDC agent (auth_kind "oidc", migration 0005); NULL for token agents.
    Column("oidc_issuer", Text),
    Column("oidc_repository", Text),
    Column("oidc_subject", Text),
    Column("oidc_workflow_ref", Text),
    Column("oidc_ref", Text),
    # The token a token agent registered with (migration 0008): its machine id is bound to
    # it while that token is valid. NULL for OIDC agents.
    Column("credential", String(128)),
    # Whether the agent is a trusted venue (migration 0006): untrusted ones take only steps of
    # untrusted builds.
    Column("trusted", Boolean, nullable=False, default=True, server_default=true()),
    # The last infrastructure failure's error (migration 0009): shown while the agent's
    # consecutive_failures run lasts, e.g. when it is unhealthy.
    Column("health_last_error", Text),
)

tokens = Table(
    "tokens",
    metadata,
    # Bearer tokens created through the API (migration 0004); tokens in runner.toml are not
    # here. Only the SHA-256 digest of the secret is stored. A revoked token keeps its row
    # (and its name) for the record.
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("sha256", String(64), nullable=False, unique=True),
    Column("trusted", Boolean, nullable=False, default=False),
    Column("created_by", String(256), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
)

launches = Table(
    "launches",
    metadata,
    # Autoscaler launches (migration 0007, docs/autoscaling.md): one row per workflow_dispatch,
    # written before the dispatch, so a restarted runner still counts pending ones.
    Column("launch_id", String(64), primary_key=True),
    Column("pool", String(128), nullable=False),
    Column("state", String(16), nullable=False),  # LaunchState
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # The agent that registered with it (also kept when it registered after expiring).
    Column("agent_machine_id", String(256)),
    Column("agent_name", String(256)),
    Column("error", Text),
    # A failed dispatch: the pool dispatches nothing before this time (cooldown, Retry-After).
    Column("retry_at", Float),
)
Index("ix_launches_state", launches.c.state)
Index("ix_launches_created_at", launches.c.created_at)

# ---- Nix CI (migration 0014, docs/ci.md) ------------------------------------------------------

ci_projects = Table(
    # Projects: those of ``[[projects]]`` (source "config", written at each start) and those
    # added through the API (source "api"). ``settings`` is the project's JSON.
    "ci_projects",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("source", String(16), nullable=False),
    Column("settings", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

ci_evaluations = Table(
    # One evaluation of one commit of one project for one ref. The unique key is what keeps
    # several runners on one database from evaluating a commit twice: the trigger inserts the
    # row once, and a runner claims it (queued -> evaluating) by a conditional update.
    "ci_evaluations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project", String(64), nullable=False),
    Column("ref", String(256), nullable=False),
    Column("commit_sha", String(64), nullable=False),
    Column("fetch_ref", String(256), nullable=False),
    Column("trigger", String(32), nullable=False),
    Column("pull_request", Integer),
    Column("trusted", Boolean, nullable=False),
    Column("state", String(32), nullable=False),
    Column("error", Text),
    Column("build_id", Integer, ForeignKey("builds.id", ondelete="SET NULL")),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("claimed_by", String(128)),
    Column("superseded_by", Integer),
    UniqueConstraint("project", "ref", "commit_sha", name="uq_ci_evaluations_commit"),
)
Index("ix_ci_evaluations_state", ci_evaluations.c.state)
Index("ix_ci_evaluations_project", ci_evaluations.c.project)

ci_jobs = Table(
    # A job of an evaluation: an attribute path, its derivation (or its evaluation error),
    # and its latest known state (kept up to date while the evaluation's build runs).
    "ci_jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "evaluation_id",
        Integer,
        ForeignKey("ci_evaluations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("attr", String(512), nullable=False),
    Column("drv_path", String(256)),
    Column("error", Text),
    Column("state", String(32), nullable=False),
    UniqueConstraint("evaluation_id", "attr", name="uq_ci_jobs_attr"),
)
Index("ix_ci_jobs_evaluation_id", ci_jobs.c.evaluation_id)

ci_webhook_deliveries = Table(
    # Webhook delivery ids seen (replay protection), forgotten after the replay window.
    "ci_webhook_deliveries",
    metadata,
    Column("delivery_id", String(128), primary_key=True),
    Column("forge", String(16), nullable=False),
    Column("received_at", Float, nullable=False),
)
Index("ix_ci_webhook_deliveries_received_at", ci_webhook_deliveries.c.received_at)

forge_outbox = Table(
    # Reports to forges not sent yet, and what was sent (migration 0012, docs/ci.md): one row
    # per evaluation. ``forge_wanted`` is what the forge should show (the checks, JSON),
    # ``forge_sent`` what it was last told (per check: fingerprint, status, check run id), so
    # a report survives a runner restart and only changes are sent. Runners sharing a
    # PostgreSQL database claim a row (``claimed_by``/``claimed_until``) before sending it.
    "forge_outbox",
    metadata,
    Column("evaluation_id", BigInteger, primary_key=True, autoincrement=False),
    Column("project", String(256), nullable=False),
    Column("forge_kind", String(16), nullable=False),
    Column("forge_target", Text, nullable=False),  # ForgeTarget as JSON (file paths, no secrets)
    Column("commit_sha", String(64), nullable=False),
    Column("forge_wanted", Text, nullable=False),
    Column("wanted_seq", Integer, nullable=False, default=0),
    Column("wanted_final", Boolean, nullable=False, default=False),
    Column("forge_sent", Text, nullable=False, default="{}"),
    Column("sent_seq", Integer, nullable=False, default=0),
    Column("pending", Boolean, nullable=False, default=True),
    Column("last_sent_at", Float),
    Column("next_attempt_at", Float, nullable=False, default=0.0),
    Column("attempts", Integer, nullable=False, default=0),
    Column("first_failure_at", Float),
    Column("last_error", Text),
    Column("gave_up", Boolean, nullable=False, default=False),
    Column("claimed_by", String(128)),
    Column("claimed_until", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)
Index("ix_forge_outbox_pending", forge_outbox.c.pending)
Index("ix_forge_outbox_updated_at", forge_outbox.c.updated_at)
