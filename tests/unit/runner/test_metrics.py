"""The metrics module: its pure decisions, the phase bookkeeping on steps, and the exposition
of one runner's own registry (parsed back with prometheus-client's parser)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bigtent.config import MetricsAuth, RunnerSection, load_runner_config
from bigtent.errors import (
    AuthError,
    BadRequest,
    ConfigError,
    Forbidden,
    NarMismatch,
    PayloadTooLarge,
    TooManyAuthFailures,
)
from bigtent.protocol import Outcome, Timings
from bigtent.runner.auth.oidc import InvalidToken, IssuerUnavailable
from bigtent.runner.auth.policy import PolicyDenied
from bigtent.runner.metrics import (
    ACTIVE_STATES,
    OTHER_SYSTEM,
    AuthFailure,
    AuthKind,
    Lifetime,
    Metrics,
    Phase,
    SystemLabels,
    UploadFailure,
    UploadKind,
    agent_kinds,
    auth_failure_reason,
    queue_depth,
    reported_phases,
    upload_failure_reason,
)
from bigtent.runner.scheduler.matching import Requirement
from bigtent.runner.scheduler.steps import StepNode
from bigtent.states import StepState

X86 = "x86_64-linux"
ARM = "aarch64-linux"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(metrics: Metrics) -> Samples:
    body, _ = metrics.render()
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[name, frozenset(labels.items())]


def node(
    sid: int = 1, system: str = X86, state: StepState = StepState.WAITING, created: float = 100.0
) -> StepNode:
    return StepNode(sid, f"/nix/store/{sid}.drv", Requirement(system, frozenset()), state, created)


# ---- pure decisions ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "credential", "reason"),
    [
        (AuthError("missing bearer token"), None, AuthFailure.MISSING),
        (AuthError("missing bearer token"), "", AuthFailure.MISSING),
        (AuthError("invalid token"), "bt_guess", AuthFailure.INVALID_TOKEN),
        (Forbidden("token role agent may not do this"), "bt_agent", AuthFailure.FORBIDDEN),
        (InvalidToken("token expired"), "a.b.c", AuthFailure.OIDC_REJECTED),
        (PolicyDenied("repository not allowed"), "a.b.c", AuthFailure.OIDC_REJECTED),
        (IssuerUnavailable("keys unavailable"), "a.b.c", AuthFailure.OIDC_UNAVAILABLE),
        (TooManyAuthFailures("slow down", retry_after_secs=3), None, AuthFailure.RATE_LIMITED),
        (TooManyAuthFailures("slow down", retry_after_secs=3), "bt_ok", AuthFailure.RATE_LIMITED),
    ],
)
def test_auth_failure_reasons(exc: AuthError, credential: str | None, reason: AuthFailure) -> None:
    assert auth_failure_reason(exc, credential) is reason


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (PayloadTooLarge("NAR is longer than its declared size"), UploadFailure.TOO_LARGE),
        (NarMismatch("NAR hash mismatch"), UploadFailure.NAR_MISMATCH),
        (NarMismatch("malformed NAR: bad magic"), UploadFailure.NAR_MISMATCH),
        (BadRequest("derivation of 99 bytes exceeds 10"), UploadFailure.REJECTED),
        (ConnectionResetError(), UploadFailure.INTERRUPTED),
        (GeneratorExit(), UploadFailure.INTERRUPTED),
    ],
)
def test_upload_failure_reasons(exc: BaseException, reason: UploadFailure) -> None:
    assert upload_failure_reason(exc) is reason


def test_reported_phases_skip_phases_that_did_not_run_and_nonsense() -> None:
    assert reported_phases(Timings(prepare_secs=0.5, build_secs=2.0, upload_secs=0.25)) == [
        (Phase.PREPARE, 0.5),
        (Phase.BUILD, 2.0),
        (Phase.UPLOAD, 0.25),
    ]
    # A failure while preparing: only that phase ran.
    assert reported_phases(Timings(prepare_secs=1.5)) == [(Phase.PREPARE, 1.5)]
    # Timings come from the agent: the protocol refuses negative, infinite and NaN values;
    # should one get past it (built without validation), it is not observed either.
    odd = Timings.model_construct(prepare_secs=-1.0, build_secs=math.inf, upload_secs=math.nan)
    assert reported_phases(odd) == []


def test_queue_depth_counts_unfinished_steps_by_system_and_state() -> None:
    nodes = [
        node(1, X86, StepState.WAITING),
        node(2, X86, StepState.WAITING),
        node(3, X86, StepState.RUNNABLE),
        node(4, ARM, StepState.BUILDING),
        node(5, ARM, StepState.ASSIGNED),
        node(6, X86, StepState.SUCCEEDED),
        node(7, X86, StepState.FAILED),
        node(8, ARM, StepState.DEPENDENCY_FAILED),
        node(9, ARM, StepState.CANCELLED),
    ]
    assert queue_depth(nodes) == {
        (X86, StepState.WAITING): 2,
        (X86, StepState.RUNNABLE): 1,
        (ARM, StepState.BUILDING): 1,
        (ARM, StepState.ASSIGNED): 1,
    }


@dataclass
class FakeSession:
    ephemeral: bool
    identity: object | None = None
    closed: bool = False
    venue: object | None = "venue"
    record: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.record = {"ephemeral": self.ephemeral}


def test_agent_kinds_count_registered_open_sessions() -> None:
    sessions = [
        FakeSession(ephemeral=False),
        FakeSession(ephemeral=False),
        FakeSession(ephemeral=True),
        FakeSession(ephemeral=True, identity="repo:acme/widgets"),
        FakeSession(ephemeral=False, closed=True),
        FakeSession(ephemeral=False, venue=None),  # connected, not registered yet
    ]
    assert agent_kinds(sessions) == {
        (Lifetime.PERSISTENT, AuthKind.TOKEN): 2,
        (Lifetime.EPHEMERAL, AuthKind.TOKEN): 1,
        (Lifetime.EPHEMERAL, AuthKind.OIDC): 1,
    }


def test_system_labels_are_bounded() -> None:
    labels = SystemLabels(limit=2)
    assert labels.label(X86) == (X86, True)
    assert labels.label(X86) == (X86, False)
    assert labels.label(ARM) == (ARM, True)
    assert labels.label("riscv64-linux") == (OTHER_SYSTEM, True)
    assert labels.label("mips-linux") == (OTHER_SYSTEM, False)
    assert labels.label(ARM) == (ARM, False)
    assert labels.known == [X86, ARM, OTHER_SYSTEM]


# ---- the registry ------------------------------------------------------------------------------
def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.narinfo_served(hit=True)
    a.narinfo_served(hit=True)
    b.narinfo_served(hit=False)
    assert value(a, "bigtent_cache_narinfo_requests_total", result="hit") == 2
    assert value(b, "bigtent_cache_narinfo_requests_total", result="hit") == 0
    assert value(b, "bigtent_cache_narinfo_requests_total", result="miss") == 1
    # Nothing of ours is in prometheus-client's global default registry.
    global_names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(n.startswith("bigtent_") for n in global_names)


def test_series_with_known_labels_start_at_zero() -> None:
    s = samples(Metrics())
    for reason in AuthFailure:
        assert s["bigtent_auth_failures_total", frozenset({("reason", reason.value)})] == 0
    for kind in UploadKind:
        assert s["bigtent_upload_nar_bytes_total", frozenset({("kind", kind.value)})] == 0
        for failure in UploadFailure:
            labels = frozenset({("kind", kind.value), ("reason", failure.value)})
            assert s["bigtent_upload_failures_total", labels] == 0
    assert ("process_cpu_seconds_total", frozenset()) in s
    assert s["bigtent_runner_info", frozenset({("version", "0.1.0")})] == 1


def test_phases_of_a_step_from_creation_to_result() -> None:
    m = Metrics()
    n = node(created=100.0)
    n.state = StepState.RUNNABLE
    m.step_runnable(n, 103.0)
    m.step_assigned(n, 103.25)
    m.step_accepted(n, 104.0)
    m.step_finished(n, Outcome.SUCCESS, Timings(prepare_secs=0.5, build_secs=7.0, upload_secs=0.1))
    s = samples(m)

    def phase(p: Phase, suffix: str) -> float:
        return s[f"bigtent_step_phase_seconds_{suffix}", frozenset({("system", X86), ("phase", p)})]

    expected = {
        Phase.QUEUED: 3.0,
        Phase.DISPATCH: 0.25,
        Phase.ACCEPT: 0.75,
        Phase.PREPARE: 0.5,
        Phase.BUILD: 7.0,
        Phase.UPLOAD: 0.1,
    }
    for p, secs in expected.items():
        assert phase(p, "count") == 1, p
        assert phase(p, "sum") == pytest.approx(secs), p
    bucket = frozenset({("system", X86), ("phase", "dispatch"), ("le", "0.25")})
    assert s["bigtent_step_phase_seconds_bucket", bucket] == 1
    bucket = frozenset({("system", X86), ("phase", "dispatch"), ("le", "0.1")})
    assert s["bigtent_step_phase_seconds_bucket", bucket] == 0
    finished = frozenset({("system", X86), ("outcome", "success")})
    assert s["bigtent_steps_finished_total", finished] == 1
    # Every outcome of a system seen has a series, at zero until it happens.
    lost = frozenset({("system", X86), ("outcome", "agent_lost")})
    assert s["bigtent_steps_finished_total", lost] == 0


def test_dispatch_latency_of_retries_and_of_steps_loaded_at_start() -> None:
    m = Metrics()
    retried = node(1)
    m.step_runnable(retried, 100.0)
    m.step_assigned(retried, 101.0)
    m.step_finished(retried, Outcome.AGENT_LOST, None)
    # A retry may run from its not-before time on: its latency counts from then.
    m.step_requeued(retried, 150.0)
    m.step_assigned(retried, 150.5)
    # A step runnable before the runner started: when it became runnable is unknown.
    loaded = node(2, state=StepState.RUNNABLE)
    m.step_assigned(loaded, 160.0)
    m.step_accepted(loaded, 160.5)
    dispatch = frozenset({("system", X86), ("phase", "dispatch")})
    s = samples(m)
    assert s["bigtent_step_phase_seconds_count", dispatch] == 2
    assert s["bigtent_step_phase_seconds_sum", dispatch] == pytest.approx(1.5)
    accept = frozenset({("system", X86), ("phase", "accept")})
    assert s["bigtent_step_phase_seconds_count", accept] == 1
    lost = frozenset({("system", X86), ("outcome", "agent_lost")})
    assert s["bigtent_steps_finished_total", lost] == 1
    # The lost attempt reported no timings: no build phase observed.
    build = frozenset({("system", X86), ("phase", "build")})
    assert s["bigtent_step_phase_seconds_count", build] == 0


def test_queue_depth_and_agents_are_read_at_scrape_time() -> None:
    m = Metrics()
    nodes = {1: node(1, X86, StepState.WAITING), 2: node(2, X86, StepState.BUILDING)}
    sessions = [FakeSession(ephemeral=True), FakeSession(ephemeral=False)]
    m.watch_steps(lambda: nodes.values())
    m.watch_sessions(lambda: sessions)
    assert value(m, "bigtent_queue_depth", system=X86, state="waiting") == 1
    assert value(m, "bigtent_queue_depth", system=X86, state="building") == 1
    assert value(m, "bigtent_queue_depth", system=X86, state="runnable") == 0
    assert value(m, "bigtent_agents_connected", lifetime="ephemeral", auth_kind="token") == 1
    assert value(m, "bigtent_agents_connected", lifetime="persistent", auth_kind="token") == 1
    nodes[3] = node(3, ARM, StepState.RUNNABLE)
    nodes[1].state = StepState.SUCCEEDED
    del nodes[2]
    sessions.clear()
    s = samples(m)
    # A system once seen stays, at zero when nothing of it waits.
    for state in ACTIVE_STATES:
        assert s["bigtent_queue_depth", frozenset({("system", X86), ("state", state)})] == 0
    assert s["bigtent_queue_depth", frozenset({("system", ARM), ("state", "runnable")})] == 1
    assert value(m, "bigtent_agents_connected", lifetime="ephemeral", auth_kind="token") == 0


def test_auth_uploads_and_autoscaler_counters() -> None:
    m = Metrics()
    m.auth_failed(AuthError("invalid token"), "bt_nope")
    m.auth_failed(AuthError("missing bearer token"), None)
    m.auth_failed(AuthError("missing bearer token"), None)
    m.upload_verified(UploadKind.OUTPUT, 1000)
    m.upload_verified(UploadKind.OUTPUT, 24)
    m.upload_failed(UploadKind.SOURCE, NarMismatch("NAR hash mismatch"))
    m.autoscaler_pools(["gha-x86"])
    m.autoscaler_launched("gha-x86")
    m.autoscaler_launched("gha-x86")
    m.autoscaler_registered("gha-x86")
    m.autoscaler_launch_expired("gha-x86")
    m.autoscaler_dispatch_failed("gha-x86")
    s = samples(m)
    assert s["bigtent_auth_failures_total", frozenset({("reason", "invalid_token")})] == 1
    assert s["bigtent_auth_failures_total", frozenset({("reason", "missing_credential")})] == 2
    assert s["bigtent_upload_nar_bytes_total", frozenset({("kind", "output")})] == 1024
    assert s["bigtent_uploads_verified_total", frozenset({("kind", "output")})] == 2
    mismatch = frozenset({("kind", "source"), ("reason", "nar_mismatch")})
    assert s["bigtent_upload_failures_total", mismatch] == 1
    pool = frozenset({("pool", "gha-x86")})
    assert s["bigtent_autoscaler_launches_total", pool] == 2
    assert s["bigtent_autoscaler_registrations_total", pool] == 1
    assert s["bigtent_autoscaler_expiries_total", pool] == 1
    assert s["bigtent_autoscaler_dispatch_failures_total", pool] == 1


def test_render_speaks_openmetrics_when_asked() -> None:
    m = Metrics()
    _, plain = m.render(None)
    assert plain.startswith("text/plain")
    body, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


@pytest.mark.parametrize(
    ("listen", "configured", "mode"),
    [
        ("127.0.0.1:8080", None, MetricsAuth.PUBLIC),
        ("[::1]:8080", None, MetricsAuth.PUBLIC),
        ("localhost:8080", None, MetricsAuth.PUBLIC),
        ("0.0.0.0:8443", None, MetricsAuth.TOKEN),
        ("192.0.2.7:8443", None, MetricsAuth.TOKEN),
        ("0.0.0.0:8443", "public", MetricsAuth.PUBLIC),
        ("127.0.0.1:8080", "token", MetricsAuth.TOKEN),
    ],
)
def test_who_may_read_metrics(listen: str, configured: str | None, mode: MetricsAuth) -> None:
    section = RunnerSection.model_validate({"listen": listen, "metrics_auth": configured})
    assert section.metrics_auth_mode is mode


def test_metrics_auth_must_be_known() -> None:
    with pytest.raises(ConfigError, match=r"runner\.metrics_auth"):
        load_runner_config(None, runner={"metrics_auth": "open"})
