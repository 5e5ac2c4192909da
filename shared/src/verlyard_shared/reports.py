"""Contracts: what agents report on `vy.rpt.<agent>.<kind>`. Every attempt report carries its attempt id
(fencing: the scheduler rejects reports of stale attempts) and a `report_id` (idempotency)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from verlyard_shared.events import GpuInfo


class Report(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every report. `report_id` is unique per report and doubles as Nats-Msg-Id."""

    report_id: str
    agent: str
    sent_at: datetime


class GpuStatus(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    utilization_pct: float = 0.0
    memory_used_mb: int = 0
    temperature_c: float | None = None


class AgentHello(Report, tag="rpt.hello", frozen=True, kw_only=True):
    """Registration: inventory and labels. Sent at start and whenever the inventory changes."""

    hostname: str
    gpus: tuple[GpuInfo, ...] = ()
    cpu_slots: int = 1
    labels: dict[str, str] = {}
    version: str = ""


class AgentHeartbeat(Report, tag="rpt.heartbeat", frozen=True, kw_only=True):
    """Liveness for the agent and a lease renewal for every attempt it lists."""

    running_attempts: tuple[str, ...] = ()
    gpus: tuple[GpuStatus, ...] = ()
    draining: bool = False


class AttemptReport(Report, frozen=True, kw_only=True):
    pipeline_id: str
    stage: str
    attempt: str


class AttemptAcceptedReport(AttemptReport, tag="rpt.accepted", frozen=True, kw_only=True):
    pass


class AttemptStartedReport(AttemptReport, tag="rpt.started", frozen=True, kw_only=True):
    pid: int | None = None


class AttemptProgressReport(AttemptReport, tag="rpt.progress", frozen=True, kw_only=True):
    step: int
    total_steps: int | None = None


class CheckpointReport(AttemptReport, tag="rpt.checkpoint", frozen=True, kw_only=True):
    step: int
    path: str
    size_bytes: int | None = None
    """Total size of the checkpoint folder's files (None: not measured)."""


class AttemptFinishedReport(AttemptReport, tag="rpt.finished", frozen=True, kw_only=True):
    """The attempt's process ended: `succeeded`, or `failed` with a failure class, or `cancelled`."""

    outcome: str
    exit_code: int | None = None
    failure_class: str | None = None
    reason: str = ""
    outputs: dict[str, Any] = {}


AnyReport = (
    AgentHello
    | AgentHeartbeat
    | AttemptAcceptedReport
    | AttemptStartedReport
    | AttemptProgressReport
    | CheckpointReport
    | AttemptFinishedReport
)
REPORT_TYPES: tuple[type[Report], ...] = (
    AgentHello,
    AgentHeartbeat,
    AttemptAcceptedReport,
    AttemptStartedReport,
    AttemptProgressReport,
    CheckpointReport,
    AttemptFinishedReport,
)
