"""Contracts: commands the scheduler sends to one agent on `vy.cmd.<agent>.<kind>` (imperative names)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from verlyard_shared.spec import StageSpec


class Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every command. `command_id` is the Nats-Msg-Id: a re-derived command dedupes."""

    command_id: str
    agent: str
    issued_at: datetime


class RunStage(Command, tag="cmd.run_stage", frozen=True, kw_only=True):
    """Run one attempt of a stage. Accepted idempotently by `attempt`."""

    pipeline_id: str
    pipeline_name: str
    stage: str
    attempt: str
    attempt_number: int
    spec: StageSpec
    gpus: tuple[int, ...] = ()
    inputs: dict[str, Any] = {}
    """Outputs of the stage's dependencies, by stage name (dataset files, checkpoint folder)."""
    resume_from_path: str | None = None
    lease_s: float = 60.0


class CancelAttempt(Command, tag="cmd.cancel_attempt", frozen=True, kw_only=True):
    """Stop an attempt: kill its whole process group, then report it cancelled."""

    pipeline_id: str
    stage: str
    attempt: str
    reason: str = "cancelled"


class DrainAgent(Command, tag="cmd.drain", frozen=True, kw_only=True):
    """Finish current work, take no new work."""

    reason: str = "drain requested"


AnyCommand = RunStage | CancelAttempt | DrainAgent
COMMAND_TYPES: tuple[type[Command], ...] = (RunStage, CancelAttempt, DrainAgent)
