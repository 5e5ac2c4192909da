"""Pure core: the public JSON shapes of the API (msgspec Structs, also the OpenAPI schema) built from views.

`PipelineOut` is the shape interface.md binds (`id, name, status, created_at, finished_at, stages{...}`)
plus extras; fields are only ever added.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from verlyard_api.views import AttemptView, PipelineView, StageView, TokenView


class AttemptOut(msgspec.Struct, kw_only=True):
    id: str
    number: int
    agent: str
    status: str
    """placed | accepted | running | succeeded | failed | lost | cancelled"""
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    failure_class: str | None
    resumed_from_step: int | None
    placed_at: datetime | None = None
    reason: str = ""
    gpus: list[int] = []
    step: int | None = None
    total_steps: int | None = None


class CheckpointOut(msgspec.Struct, kw_only=True):
    step: int
    path: str


class StageOut(msgspec.Struct, kw_only=True):
    status: str
    """pending | running | succeeded | failed | skipped | cancelled"""
    kind: str
    needs: list[str]
    pending_reason: str | None
    outputs: dict[str, Any]
    attempts: list[AttemptOut]
    when: str = "on_success"
    priority: int = 0
    reason: str = ""
    not_before: datetime | None = None
    finished_at: datetime | None = None
    checkpoint: CheckpointOut | None = None


class PipelineOut(msgspec.Struct, kw_only=True):
    id: str
    name: str
    status: str
    """pending | running | succeeded | failed | cancelled"""
    created_at: datetime
    finished_at: datetime | None
    stages: dict[str, StageOut]
    labels: dict[str, str] = {}
    priority: int = 0
    submitted_by: str = ""
    correlation_id: str = ""
    idempotency_key: str | None = None
    updated_at: datetime | None = None
    cancel_requested: bool = False
    reason: str = ""
    failed_stages: list[str] = []
    retries: int = 0
    version: int = 0
    """The pipeline stream's version this state reflects."""
    spec: dict[str, Any] | None = None
    """The normalised spec (defaults applied, durations in seconds)."""


class PipelineSummary(msgspec.Struct, kw_only=True):
    id: str
    name: str
    status: str
    created_at: datetime
    finished_at: datetime | None
    updated_at: datetime
    labels: dict[str, str]
    priority: int
    submitted_by: str
    stage_statuses: dict[str, str]
    """Each stage's status, in spec order."""


class PipelinePage(msgspec.Struct, kw_only=True):
    items: list[PipelineSummary]
    next: str | None
    """Opaque cursor of the next page (pass it as `cursor`); null on the last page."""


class EventOut(msgspec.Struct, kw_only=True):
    """One recorded event in the public audit shape (interface.md)."""

    position: int
    event_id: str
    stream_id: str
    version: int
    type: str
    recorded_at: str
    actor: str
    correlation_id: str
    causation_id: str | None
    data: dict[str, Any]
    schema_version: int = 1


class EventPage(msgspec.Struct, kw_only=True):
    items: list[EventOut]
    next: int | None
    """Pass it as `after` for the next page; null when this page reached the end of the log."""


class TokenCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["admin", "member", "viewer"]
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,62}$")] | None = None


class TokenOut(msgspec.Struct, kw_only=True):
    id: str
    name: str
    role: str
    created_at: datetime
    created_by: str


class TokenCreated(msgspec.Struct, kw_only=True):
    """The only time a token's secret is shown: store it now."""

    id: str
    name: str
    role: str
    created_at: datetime
    created_by: str
    token: str


class TokenPage(msgspec.Struct, kw_only=True):
    items: list[TokenOut]
    next: int | None


class CancelBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(max_length=1000)] | None = None


class RetryBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    stages: Annotated[list[str], msgspec.Meta(max_length=1000)] = []
    """Stages to run again (default: every failed, cancelled or skipped stage)."""


class DifferenceOut(msgspec.Struct, kw_only=True):
    kind: str
    id: str
    field: str
    expected: Any
    found: Any


class ReplayOut(msgspec.Struct, kw_only=True):
    mode: Literal["verify", "rebuild"]
    ok: bool
    """verify: no difference found; rebuild: the read models were replaced."""
    position: int
    pipelines: int
    tokens: int
    differences: list[DifferenceOut]
    truncated: bool = False


class ErrorIssue(msgspec.Struct, kw_only=True):
    path: str
    message: str
    line: int | None = None


class ErrorOut(msgspec.Struct, kw_only=True):
    """Every error: a stable code, a readable detail, and for bad specs the issues with path and line."""

    error: str
    detail: str
    issues: list[ErrorIssue] = []
    request_id: str | None = None


# ---- builders -----------------------------------------------------------------------------------------


def attempt_out(a: AttemptView) -> AttemptOut:
    return AttemptOut(
        id=a.id,
        number=a.number,
        agent=a.agent,
        status=a.status,
        started_at=a.started_at,
        finished_at=a.finished_at,
        exit_code=a.exit_code,
        failure_class=a.failure_class,
        resumed_from_step=a.resumed_from_step,
        placed_at=a.placed_at,
        reason=a.reason,
        gpus=list(a.gpus),
        step=a.step,
        total_steps=a.total_steps,
    )


def stage_out(s: StageView) -> StageOut:
    checkpoint = (
        CheckpointOut(step=s.checkpoint_step, path=s.checkpoint_path)
        if s.checkpoint_step is not None and s.checkpoint_path is not None
        else None
    )
    return StageOut(
        status=s.status,
        kind=s.kind,
        needs=list(s.needs),
        pending_reason=s.pending_reason,
        outputs=s.outputs,
        attempts=[attempt_out(a) for a in s.attempts],
        when=s.when,
        priority=s.priority,
        reason=s.reason,
        not_before=s.not_before,
        finished_at=s.finished_at,
        checkpoint=checkpoint,
    )


def pipeline_out(v: PipelineView, *, with_spec: bool = True) -> PipelineOut:
    return PipelineOut(
        id=v.id,
        name=v.name,
        status=v.status,
        created_at=v.created_at,
        finished_at=v.finished_at,
        stages={name: stage_out(s) for name, s in v.stages.items()},
        labels=v.labels,
        priority=v.priority,
        submitted_by=v.submitted_by,
        correlation_id=v.correlation_id,
        idempotency_key=v.idempotency_key,
        updated_at=v.updated_at,
        cancel_requested=v.cancel_requested,
        reason=v.reason,
        failed_stages=list(v.failed_stages),
        retries=v.retries,
        version=v.version,
        spec=msgspec.to_builtins(v.spec) if with_spec else None,
    )


def token_out(t: TokenView) -> TokenOut:
    return TokenOut(id=t.id, name=t.name, role=t.role, created_at=t.created_at, created_by=t.created_by)
