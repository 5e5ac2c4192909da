"""Contracts: every domain event, as frozen, keyword-only, explicitly tagged msgspec Structs.

Tags are public and never change meaning (docs/events.md). Evolve additively: a new field gets a
default; a breaking change gets a new tag and an upcaster. Every stage event names its `stage`,
every attempt event its `attempt`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from verlyard_shared.spec import PipelineSpec


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every event; the `type` tag is set explicitly on each subclass."""


# ---- pipeline lifecycle (stream `pipeline-<id>`) -------------------------------------------------


class PipelineSubmitted(Event, tag="pipeline.submitted", frozen=True, kw_only=True):
    pipeline_id: str
    spec: PipelineSpec
    idempotency_key: str | None = None
    """The client's Idempotency-Key, when given: same key + same body -> same pipeline."""
    body_sha256: str | None = None


class PipelineCancelRequested(Event, tag="pipeline.cancel_requested", frozen=True, kw_only=True):
    pipeline_id: str
    reason: str = "cancelled by user"


class PipelineRetryRequested(Event, tag="pipeline.retry_requested", frozen=True, kw_only=True):
    pipeline_id: str
    stages: tuple[str, ...]
    """The failed/cancelled/skipped stages that run again; succeeded ones are kept."""


class PipelineSucceeded(Event, tag="pipeline.succeeded", frozen=True, kw_only=True):
    pipeline_id: str


class PipelineFailed(Event, tag="pipeline.failed", frozen=True, kw_only=True):
    pipeline_id: str
    reason: str
    failed_stages: tuple[str, ...] = ()


class PipelineCancelled(Event, tag="pipeline.cancelled", frozen=True, kw_only=True):
    pipeline_id: str
    reason: str


# ---- stages and attempts (stream `pipeline-<id>`) -------------------------------------------------


class StagePending(Event, tag="stage.pending", frozen=True, kw_only=True):
    """The scheduler could not place a ready stage; `reason` answers "why is my stage pending?"."""

    pipeline_id: str
    stage: str
    reason: str


class StagePlaced(Event, tag="stage.placed", frozen=True, kw_only=True):
    """A new attempt of `stage` is assigned to `agent`; `placement` records why this agent."""

    pipeline_id: str
    stage: str
    attempt: str
    attempt_number: int
    agent: str
    gpus: tuple[int, ...] = ()
    cpu_slots: int = 1
    lease_expires_at: datetime | None = None
    resume_from_step: int | None = None
    resume_from_path: str | None = None
    placement: dict[str, Any] = {}


class AttemptAccepted(Event, tag="attempt.accepted", frozen=True, kw_only=True):
    pipeline_id: str
    stage: str
    attempt: str
    agent: str


class AttemptStarted(Event, tag="attempt.started", frozen=True, kw_only=True):
    pipeline_id: str
    stage: str
    attempt: str
    agent: str
    pid: int | None = None


class AttemptProgressed(Event, tag="attempt.progressed", frozen=True, kw_only=True):
    """Sparse progress marks (not every step): the latest step seen and the expected total."""

    pipeline_id: str
    stage: str
    attempt: str
    step: int
    total_steps: int | None = None


class CheckpointSaved(Event, tag="checkpoint.saved", frozen=True, kw_only=True):
    pipeline_id: str
    stage: str
    attempt: str
    step: int
    path: str
    size_bytes: int | None = None
    """Total size of the checkpoint folder's files, as the agent measured it."""


class StageSucceeded(Event, tag="stage.succeeded", frozen=True, kw_only=True):
    pipeline_id: str
    stage: str
    attempt: str
    outputs: dict[str, Any] = {}
    exit_code: int | None = 0


class StageFailed(Event, tag="stage.failed", frozen=True, kw_only=True):
    pipeline_id: str
    stage: str
    attempt: str
    failure_class: str
    reason: str = ""
    exit_code: int | None = None


class StageRetryScheduled(Event, tag="stage.retry_scheduled", frozen=True, kw_only=True):
    """A failed or lost attempt will be retried, not before `not_before`."""

    pipeline_id: str
    stage: str
    attempt: str
    next_attempt_number: int
    not_before: datetime


class StageSkipped(Event, tag="stage.skipped", frozen=True, kw_only=True):
    pipeline_id: str
    stage: str
    reason: str


class StageCancelled(Event, tag="stage.cancelled", frozen=True, kw_only=True):
    pipeline_id: str
    stage: str
    attempt: str | None = None
    reason: str = "cancelled"


class AttemptLost(Event, tag="attempt.lost", frozen=True, kw_only=True):
    """No heartbeat within the lease: the attempt is declared lost (its late reports are rejected)."""

    pipeline_id: str
    stage: str
    attempt: str
    agent: str
    reason: str


class ReportRejected(Event, tag="report.rejected", frozen=True, kw_only=True):
    """An agent report that did not match current state (stale attempt, unknown stage): audited."""

    pipeline_id: str
    stage: str
    attempt: str
    agent: str
    report_type: str
    reason: str


# ---- agents (stream `agent-<id>`) -------------------------------------------------------------------


class GpuInfo(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    name: str
    uuid: str = ""
    memory_total_mb: int = 0


class AgentRegistered(Event, tag="agent.registered", frozen=True, kw_only=True):
    agent: str
    hostname: str
    gpus: tuple[GpuInfo, ...] = ()
    cpu_slots: int = 1
    labels: dict[str, str] = {}
    version: str = ""


class AgentDrainRequested(Event, tag="agent.drain_requested", frozen=True, kw_only=True):
    agent: str
    reason: str = "drain requested"


class AgentLost(Event, tag="agent.lost", frozen=True, kw_only=True):
    agent: str
    reason: str


class AgentDeregistered(Event, tag="agent.deregistered", frozen=True, kw_only=True):
    agent: str
    reason: str = "stopped"


# ---- control-plane resources (streams `host-<name>`, `dataset-<id>`, `token-<id>`) ----------------


class HostAdded(Event, tag="host.added", frozen=True, kw_only=True):
    """An SSH host; its encrypted credentials live in a table, never in an event."""

    name: str
    address: str
    port: int = 22
    user: str
    host_key_fingerprint: str = ""
    labels: dict[str, str] = {}


class HostRemoved(Event, tag="host.removed", frozen=True, kw_only=True):
    name: str


class HostProbed(Event, tag="host.probed", frozen=True, kw_only=True):
    name: str
    ok: bool
    result: dict[str, Any] = {}


class DatasetUploaded(Event, tag="dataset.uploaded", frozen=True, kw_only=True):
    dataset_id: str
    name: str
    sha256: str
    size_bytes: int
    filename: str = ""


class TokenCreated(Event, tag="token.created", frozen=True, kw_only=True):
    """A token was issued; only its id, name and role are recorded (never the secret)."""

    token_id: str
    name: str
    role: str


AnyEvent = (
    PipelineSubmitted
    | PipelineCancelRequested
    | PipelineRetryRequested
    | PipelineSucceeded
    | PipelineFailed
    | PipelineCancelled
    | StagePending
    | StagePlaced
    | AttemptAccepted
    | AttemptStarted
    | AttemptProgressed
    | CheckpointSaved
    | StageSucceeded
    | StageFailed
    | StageRetryScheduled
    | StageSkipped
    | StageCancelled
    | AttemptLost
    | ReportRejected
    | AgentRegistered
    | AgentDrainRequested
    | AgentLost
    | AgentDeregistered
    | HostAdded
    | HostRemoved
    | HostProbed
    | DatasetUploaded
    | TokenCreated
)

EVENT_TYPES: tuple[type[Event], ...] = (
    PipelineSubmitted,
    PipelineCancelRequested,
    PipelineRetryRequested,
    PipelineSucceeded,
    PipelineFailed,
    PipelineCancelled,
    StagePending,
    StagePlaced,
    AttemptAccepted,
    AttemptStarted,
    AttemptProgressed,
    CheckpointSaved,
    StageSucceeded,
    StageFailed,
    StageRetryScheduled,
    StageSkipped,
    StageCancelled,
    AttemptLost,
    ReportRejected,
    AgentRegistered,
    AgentDrainRequested,
    AgentLost,
    AgentDeregistered,
    HostAdded,
    HostRemoved,
    HostProbed,
    DatasetUploaded,
    TokenCreated,
)


def event_type(event: Event) -> str:
    """The public tag of an event instance, e.g. `stage.placed`."""
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return tag
