"""The agent <-> runner WebSocket protocol (architecture §2): every message, its limits, no I/O.

This module is the single source of truth for the wire format. Messages are JSON objects with a
``type`` discriminator. Unknown fields are ignored; unknown types are a ``ProtocolError``. Every
text field has a length limit, every list a count limit and every message a size limit: the
named constants below are the only place those limits live.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal, NewType

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from bigtent.apilimits import MAX_ID
from bigtent.apilimits import MAX_REFERENCES as MAX_REFERENCES
from bigtent.errors import ProtocolError

PROTOCOL_VERSION = "bigtent/1"

StepId = NewType("StepId", int)
LeaseId = NewType("LeaseId", str)
MachineId = NewType("MachineId", str)

# ---- limits -------------------------------------------------------------------------------
MAX_MESSAGE_BYTES = 1024 * 1024
"""No single WebSocket message (either direction) may exceed this."""
MAX_NAME_CHARS = 128
"""Agent names: at most 128 characters (architecture §4 bounds the UTF-8 bytes; checked there)."""
MAX_SHORT_TEXT = 256
"""Ids, hostnames, systems, features, store paths."""
MAX_ERROR_CHARS = 8192
MAX_LIST_ITEMS = 256
"""Systems, features, running steps, outputs, references of one output..."""
MAX_LOG_LINES_PER_BATCH = 2000
MAX_LOG_LINE_CHARS = 16 * 1024
MAX_ASSIGN_DRV_BYTES = 256 * 1024
"""An ``assign`` carries the step's .drv text and inputs only when they take at most this many
bytes of JSON together (else the agent fetches the .drv, as an old runner makes it)."""
MAX_ASSIGN_INPUTS = 4096
"""At most this many resolved input paths in an ``assign``."""

MAX_BYTES = 2**62
"""Byte counts (memory, disk, NAR sizes, log limits): 4 EiB, far beyond any machine."""
MAX_EXIT_CODE = 2**31 - 1
"""Exit codes and signals: a process status fits a 32-bit int (negative: a signal)."""
MAX_SECS = 10.0 * 365 * 24 * 3600
"""Durations (timeouts, phase timings, heartbeat and lease periods): at most ten years."""
MAX_LOAD = 1e6
"""Load averages and pressure percentages."""

ShortText = Annotated[str, Field(max_length=MAX_SHORT_TEXT)]
WireStepId = Annotated[StepId, Field(ge=0, le=MAX_ID)]
"""Every numeric field has a range, enforced where messages are parsed: an agent sending
``10**400`` gets an ``error``, never an overflow in the database or a page. A step id is at
most what its ``INTEGER`` column holds on PostgreSQL (``apilimits.MAX_ID``), as in the API's
paths."""
ByteCount = Annotated[int, Field(ge=0, le=MAX_BYTES)]
Seconds = Annotated[float, Field(ge=0, le=MAX_SECS, allow_inf_nan=False)]
ExitCode = Annotated[int, Field(ge=-MAX_EXIT_CODE - 1, le=MAX_EXIT_CODE)]
Gauge = Annotated[float, Field(ge=0, le=MAX_LOAD, allow_inf_nan=False)]
StorePathText = Annotated[str, Field(max_length=MAX_SHORT_TEXT, pattern=r"^/nix/store/[^/]+$")]
FeatureList = Annotated[list[ShortText], Field(max_length=MAX_LIST_ITEMS)]


class Outcome(StrEnum):
    """How a step attempt ended (architecture §2). Values are wire and database strings."""

    SUCCESS = "success"
    BUILD_FAILURE = "build_failure"
    TIMED_OUT = "timed_out"
    LOG_LIMIT = "log_limit"
    ABORTED = "aborted"
    PREPARE_FAILURE = "prepare_failure"
    UPLOAD_FAILURE = "upload_failure"
    AGENT_LOST = "agent_lost"
    UNSUPPORTED = "unsupported"
    """Set by the runner, never sent by an agent: no venue could take the step for
    ``scheduler.capacity_grace_secs`` (no agent, SSH builder or autoscaler pool offers its
    system and features)."""

    @property
    def is_infrastructure(self) -> bool:
        """Infrastructure outcomes are retried elsewhere and never cached as build failures."""
        return self in _INFRASTRUCTURE


_INFRASTRUCTURE = frozenset({Outcome.PREPARE_FAILURE, Outcome.UPLOAD_FAILURE, Outcome.AGENT_LOST})


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# ---- agent -> runner ----------------------------------------------------------------------
class RunningStep(_Message):
    step_id: WireStepId
    lease_id: LeaseId = Field(max_length=MAX_SHORT_TEXT)


class Register(_Message):
    type: Literal["register"] = "register"
    proto: ShortText = PROTOCOL_VERSION
    version: ShortText = ""
    machine_id: MachineId = Field(min_length=1, max_length=MAX_SHORT_TEXT)
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    hostname: ShortText = ""
    systems: FeatureList = Field(min_length=1)
    supported_features: FeatureList = []
    mandatory_features: FeatureList = []
    max_jobs: int = Field(ge=1, le=MAX_LIST_ITEMS)
    """At most as many as a heartbeat's ``running`` list may hold."""
    cpu_count: int = Field(default=1, ge=1, le=65536)
    speed_factor: float = Field(default=1.0, gt=0, le=1000, allow_inf_nan=False)
    ephemeral: bool = False
    launch_id: ShortText | None = None
    running: Annotated[list[RunningStep], Field(max_length=MAX_LIST_ITEMS)] = []
    untrusted: bool = False
    """The agent asks to be an untrusted venue: it takes only steps of untrusted builds
    (docs/security.md). A runner that does not say ``untrusted`` in ``registered`` ignored it."""
    free_store_bytes: ByteCount | None = None
    """Free disk in the agent's store at registration (then in every heartbeat), so the
    runner judges its room (``scheduler.min_free_store_bytes``) before the first heartbeat."""


class Heartbeat(_Message):
    type: Literal["heartbeat"] = "heartbeat"
    load: Gauge | None = None
    memory_used_bytes: ByteCount | None = None
    memory_total_bytes: ByteCount | None = None
    free_store_bytes: ByteCount | None = None
    free_build_bytes: ByteCount | None = None
    psi_cpu_some_avg10: Gauge | None = None
    running: Annotated[list[WireStepId], Field(max_length=MAX_LIST_ITEMS)] = []
    draining: bool = False
    """The agent takes no new work (a limit, SIGTERM or ``drain``): stop assigning it."""


class Accepted(_Message):
    type: Literal["accepted"] = "accepted"
    step_id: WireStepId
    lease_id: LeaseId = Field(max_length=MAX_SHORT_TEXT)


class Refused(_Message):
    type: Literal["refused"] = "refused"
    step_id: WireStepId
    lease_id: LeaseId = Field(max_length=MAX_SHORT_TEXT)
    reason: str = Field(default="", max_length=MAX_ERROR_CHARS)


class Log(_Message):
    type: Literal["log"] = "log"
    step_id: WireStepId
    lease_id: LeaseId = Field(max_length=MAX_SHORT_TEXT)
    lines: Annotated[
        list[Annotated[str, Field(max_length=MAX_LOG_LINE_CHARS)]],
        Field(max_length=MAX_LOG_LINES_PER_BATCH),
    ]


class OutputInfo(_Message):
    name: ShortText
    path: StorePathText
    nar_hash: ShortText = ""
    nar_size: ByteCount = 0
    references: Annotated[list[StorePathText], Field(max_length=MAX_REFERENCES)] = []


class Timings(_Message):
    """Seconds the agent spent in each phase of the attempt."""

    prepare_secs: Seconds = 0.0
    build_secs: Seconds = 0.0
    upload_secs: Seconds = 0.0


class Result(_Message):
    type: Literal["result"] = "result"
    step_id: WireStepId
    lease_id: LeaseId = Field(max_length=MAX_SHORT_TEXT)
    outcome: Outcome
    exit_code: ExitCode | None = None
    error: str = Field(default="", max_length=MAX_ERROR_CHARS)
    timings: Timings = Timings()
    outputs: Annotated[list[OutputInfo], Field(max_length=MAX_LIST_ITEMS)] = []


AgentMessage = Annotated[
    Register | Heartbeat | Accepted | Refused | Log | Result, Field(discriminator="type")
]


# ---- runner -> agent ----------------------------------------------------------------------
class Substituter(_Message):
    url: ShortText
    public_key: ShortText


class Registered(_Message):
    type: Literal["registered"] = "registered"
    proto: ShortText = PROTOCOL_VERSION
    session_id: ShortText
    heartbeat_secs: Seconds
    lease_secs: Seconds
    cache_url: ShortText
    cache_public_key: ShortText
    upstreams: Annotated[list[Substituter], Field(max_length=MAX_LIST_ITEMS)] = []
    """Further caches to substitute from, in order, after ``cache_url``. For an untrusted
    venue the runner's untrusted cache comes first; a trusted venue never gets it."""
    keep_running: Annotated[list[WireStepId], Field(max_length=MAX_LIST_ITEMS)] = []
    """Of the steps the agent reported as running, those whose leases are still current."""
    untrusted: bool = False
    """The runner treats the agent as an untrusted venue (it asked to be, or its OIDC rule
    says ``allow_untrusted``): it gets untrusted steps only."""
    presigned_uploads: bool = False
    """The runner stores NARs in S3 and takes outputs through presigned uploads: the agent
    compresses each output NAR as ``compression``/``compression_level`` say and asks
    ``POST <upload URL>/presign`` (docs/api.md). False (and from older runners): PUT each NAR
    to the runner."""
    compression: Annotated[str, Field(max_length=16)] = "none"
    compression_level: int = Field(default=0, ge=0, le=22)


class Assign(_Message):
    type: Literal["assign"] = "assign"
    step_id: WireStepId
    lease_id: LeaseId = Field(max_length=MAX_SHORT_TEXT)
    drv_path: StorePathText
    outputs: Annotated[dict[ShortText, StorePathText], Field(max_length=MAX_LIST_ITEMS)]
    """Output name -> expected store path."""
    upload_urls: Annotated[
        dict[ShortText, Annotated[str, Field(max_length=4096)]], Field(max_length=MAX_LIST_ITEMS)
    ]
    """Output name -> URL to PUT that output's NAR to (relative URLs are on the runner)."""
    timeout_secs: Seconds
    max_silent_secs: Seconds
    max_log_bytes: ByteCount
    drv_text: str | None = Field(default=None, max_length=MAX_ASSIGN_DRV_BYTES)
    """The .drv's ATerm text (None: fetch it from the cache). The agent checks it is the text of
    ``drv_path`` (its text store path) exactly as it checks a fetched one."""
    inputs: Annotated[list[StorePathText], Field(max_length=MAX_ASSIGN_INPUTS)] | None = None
    """The step's resolved input paths: the input sources and the wanted outputs of the input
    derivations (None: the agent resolves them from the input .drvs it fetches). Sent only
    with ``drv_text``."""


class Abort(_Message):
    type: Literal["abort"] = "abort"
    step_id: WireStepId
    reason: str = Field(default="", max_length=MAX_ERROR_CHARS)


class Drain(_Message):
    type: Literal["drain"] = "drain"
    reason: str = Field(default="", max_length=MAX_ERROR_CHARS)


class ResultAck(_Message):
    type: Literal["result_ack"] = "result_ack"
    step_id: WireStepId
    lease_id: LeaseId = Field(max_length=MAX_SHORT_TEXT)
    recorded: bool
    """False when the lease was no longer current: the result was acknowledged and ignored."""


class Error(_Message):
    type: Literal["error"] = "error"
    message: str = Field(max_length=MAX_ERROR_CHARS)


RunnerMessage = Annotated[
    Registered | Assign | Abort | Drain | ResultAck | Error, Field(discriminator="type")
]

_agent_adapter: TypeAdapter[AgentMessage] = TypeAdapter(AgentMessage)
_runner_adapter: TypeAdapter[RunnerMessage] = TypeAdapter(RunnerMessage)

# ---- upload headers (HTTP PUT of an output NAR) -------------------------------------------
NAR_HASH_HEADER = "X-Nar-Hash"
"""``sha256:<nix-base32>`` of the uncompressed NAR the body carries."""
NAR_SIZE_HEADER = "X-Nar-Size"
"""Size in bytes of the uncompressed NAR the body carries."""


# ---- presigned uploads (HTTP, docs/api.md) --------------------------------------------------
PRESIGN_SUFFIX = "/presign"
COMPLETE_SUFFIX = "/complete"
"""Appended to an ``assign.upload_urls`` entry: where to ask for a presigned upload of that
output, and where to report it uploaded."""
MAX_URL_CHARS = 8192


class UploadDeclaration(BaseModel):
    """What an agent declares about one output file, before uploading it (``presign``) and
    after (``complete``): the NAR (uncompressed) and the file (compressed) it sends."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    nar_hash: ShortText
    """``sha256:<nix32>`` (or SRI) of the uncompressed NAR."""
    nar_size: ByteCount
    compression: Annotated[str, Field(max_length=16)]
    """``zstd``, ``xz`` or ``none``: the runner's ``registered.compression``."""
    file_hash: ShortText
    """``sha256:<nix32>`` of the file as uploaded (compressed)."""
    file_size: ByteCount


class UploadMethod(StrEnum):
    PRESIGNED = "presigned"
    """PUT the file to ``url`` with ``headers`` (and no credential), then POST the same
    declaration to ``complete_url``."""
    PUT = "put"
    """The runner takes the NAR itself: PUT it (uncompressed) to ``url`` as before."""
    CACHED = "cached"
    """The path is in the cache already: nothing to upload; ``path`` etc. describe it."""


class UploadPlan(BaseModel):
    """The runner's answer to ``presign``."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    method: UploadMethod
    url: Annotated[str, Field(max_length=MAX_URL_CHARS)] = ""
    headers: Annotated[
        dict[ShortText, Annotated[str, Field(max_length=MAX_URL_CHARS)]],
        Field(max_length=MAX_LIST_ITEMS),
    ] = {}
    complete_url: Annotated[str, Field(max_length=MAX_URL_CHARS)] = ""
    expires_secs: Seconds = 0.0
    path: ShortText = ""
    nar_hash: ShortText = ""
    nar_size: ByteCount = 0
    references: Annotated[list[ShortText], Field(max_length=MAX_REFERENCES)] = []


def _parse(adapter: TypeAdapter[object], data: str | bytes) -> object:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return adapter.validate_json(data)
    except ValidationError as exc:
        errors = exc.errors()
        if not errors:
            raise ProtocolError(f"invalid message: {exc}") from exc
        where = ".".join(str(part) for part in errors[0]["loc"])
        raise ProtocolError(f"invalid message: {where}: {errors[0]['msg']}") from exc


def parse_agent_message(data: str | bytes) -> AgentMessage:
    """Parse one agent -> runner message, or raise ProtocolError."""
    return _parse(_agent_adapter, data)  # type: ignore[arg-type, return-value]


def parse_runner_message(data: str | bytes) -> RunnerMessage:
    """Parse one runner -> agent message, or raise ProtocolError."""
    return _parse(_runner_adapter, data)  # type: ignore[arg-type, return-value]


def encode(message: BaseModel) -> str:
    """Serialise a message for the wire."""
    text = message.model_dump_json()
    if len(text) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(text)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return text
