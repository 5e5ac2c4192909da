"""Pure core: the read-model views (a pipeline with its stages and attempts, a token) and their statuses."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, Literal

import msgspec

from verlyard_shared.spec import PipelineSpec

PipelineStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]
StageStatus = Literal["pending", "running", "succeeded", "failed", "skipped", "cancelled"]
AttemptStatus = Literal["placed", "accepted", "running", "succeeded", "failed", "lost", "cancelled"]

PIPELINE_STATUSES: Final[tuple[str, ...]] = ("pending", "running", "succeeded", "failed", "cancelled")
PIPELINE_TERMINAL: Final = frozenset({"succeeded", "failed", "cancelled"})
ATTEMPT_ACTIVE: Final = frozenset({"placed", "accepted", "running"})
RETRYABLE_STAGE_STATUSES: Final = frozenset({"failed", "cancelled", "skipped"})

PIPELINE_PREFIX: Final = "pipeline-"
TOKEN_PREFIX: Final = "token-"


class AttemptView(msgspec.Struct, frozen=True, kw_only=True):
    """One try of a stage, as the API shows it."""

    id: str
    number: int
    agent: str
    status: AttemptStatus = "placed"
    gpus: tuple[int, ...] = ()
    placed_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    failure_class: str | None = None
    reason: str = ""
    resumed_from_step: int | None = None
    resume_from_path: str | None = None
    step: int | None = None
    """The latest training step reported (sparse progress marks)."""
    total_steps: int | None = None


class StageView(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: str
    needs: tuple[str, ...] = ()
    when: str = "on_success"
    priority: int = 0
    status: StageStatus = "pending"
    pending_reason: str | None = None
    """Why the stage is not placed yet (the scheduler's `stage.pending`, or a retry's backoff)."""
    reason: str = ""
    """Why the stage failed, was skipped or was cancelled."""
    outputs: dict[str, Any] = {}
    not_before: datetime | None = None
    checkpoint_step: int | None = None
    checkpoint_path: str | None = None
    finished_at: datetime | None = None
    attempts: tuple[AttemptView, ...] = ()

    @property
    def current(self) -> AttemptView | None:
        return self.attempts[-1] if self.attempts else None

    def attempt(self, attempt_id: str) -> AttemptView | None:
        for attempt in self.attempts:
            if attempt.id == attempt_id:
                return attempt
        return None


class PipelineView(msgspec.Struct, frozen=True, kw_only=True):
    """A pipeline's read model: what `GET /api/v1/pipelines/{id}` shows (rows of three tables)."""

    id: str
    name: str
    spec: PipelineSpec
    labels: dict[str, str] = {}
    priority: int = 0
    status: PipelineStatus = "pending"
    submitted_by: str
    """The actor of `pipeline.submitted` (`token:<id>:<name>`): members manage only their own pipelines."""
    correlation_id: str
    idempotency_key: str | None = None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    cancel_requested: bool = False
    reason: str = ""
    failed_stages: tuple[str, ...] = ()
    retries: int = 0
    version: int
    """The stream version applied last: envelopes at or below it are duplicates."""
    submitted_position: int
    """Global position of `pipeline.submitted`: the list order and the cursor key."""
    position: int
    """Global position of the last applied event."""
    stages: dict[str, StageView]

    @property
    def terminal(self) -> bool:
        return self.status in PIPELINE_TERMINAL


class TokenView(msgspec.Struct, frozen=True, kw_only=True):
    """A token's public record (its secret's hash is not a projection: see adapters/pg_tokens.py)."""

    id: str
    name: str
    role: str
    created_at: datetime
    created_by: str
    position: int
