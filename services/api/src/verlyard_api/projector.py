"""Pure core: project events into the read models (pipelines, stages, attempts, tokens) and diff them into row changes.

The pipeline rules mirror the scheduler's fold (`verlyard_scheduler.fold`), so the read model shows
what the scheduler acts on: an attempt ends only while it is its stage's current, active attempt
(stale reports change nothing), terminal pipelines ignore later placements, a retry request resets
the failed/cancelled/skipped stages (and those that were skipped or cancelled because of them).
Every view remembers the stream version it has applied, so a re-delivered envelope changes nothing.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, assert_never

import msgspec
from msgspec.structs import replace

from verlyard_api.views import (
    ATTEMPT_ACTIVE,
    PIPELINE_PREFIX,
    RETRYABLE_STAGE_STATUSES,
    AttemptStatus,
    AttemptView,
    PipelineStatus,
    PipelineView,
    StageStatus,
    StageView,
    TokenView,
)
from verlyard_shared.envelope import Envelope
from verlyard_shared.events import (
    AgentDeregistered,
    AgentDrainRequested,
    AgentLost,
    AgentRegistered,
    AnyEvent,
    AttemptAccepted,
    AttemptLost,
    AttemptProgressed,
    AttemptStarted,
    CheckpointSaved,
    DatasetUploaded,
    HostAdded,
    HostProbed,
    HostRemoved,
    PipelineCancelled,
    PipelineCancelRequested,
    PipelineFailed,
    PipelineRetryRequested,
    PipelineSubmitted,
    PipelineSucceeded,
    ReportRejected,
    StageCancelled,
    StageFailed,
    StagePending,
    StagePlaced,
    StageRetryScheduled,
    StageSkipped,
    StageSucceeded,
    TokenCreated,
)
from verlyard_shared.spec import PipelineSpec

# ---- row changes ------------------------------------------------------------------------------------


class PipelineRow(msgspec.Struct, frozen=True, kw_only=True):
    """Upsert the `pipelines` row of `view` (its stages and attempts are separate changes)."""

    view: PipelineView


class StageRow(msgspec.Struct, frozen=True, kw_only=True):
    pipeline_id: str
    ordinal: int
    """The stage's place in the pipeline (dependency order: `stage_order`)."""
    stage: StageView


class AttemptRow(msgspec.Struct, frozen=True, kw_only=True):
    pipeline_id: str
    stage: str
    ordinal: int
    """The attempt's place in its stage's history."""
    attempt: AttemptView


class TokenRow(msgspec.Struct, frozen=True, kw_only=True):
    token: TokenView


RowChange = PipelineRow | StageRow | AttemptRow | TokenRow


def pipeline_id_of(stream_id: str) -> str | None:
    """`pipeline-<id>` -> `<id>`; None for other streams."""
    return stream_id[len(PIPELINE_PREFIX) :] if stream_id.startswith(PIPELINE_PREFIX) else None


# ---- the pipeline projection --------------------------------------------------------------------------


def evolve(view: PipelineView | None, envelope: Envelope) -> PipelineView | None:
    """Apply one envelope of a `pipeline-<id>` stream; None while the stream has no `pipeline.submitted`."""
    if view is not None and envelope.version <= view.version:
        return view  # applied already: a re-delivery, or a batch overlapping the stored row
    at = envelope.recorded_at
    if view is None:
        event = envelope.event
        if not isinstance(event, PipelineSubmitted):
            return None  # not a pipeline's first event: nothing to show (the scheduler's fold refuses it too)
        spec = event.spec
        return PipelineView(
            id=event.pipeline_id,
            name=spec.name,
            spec=spec,
            labels=dict(spec.labels),
            priority=spec.priority,
            submitted_by=envelope.actor,
            correlation_id=envelope.correlation_id,
            idempotency_key=event.idempotency_key,
            created_at=at,
            updated_at=at,
            version=envelope.version,
            submitted_position=envelope.position,
            position=envelope.position,
            stages={
                name: StageView(
                    name=name,
                    kind=spec.stages[name].kind,
                    needs=spec.stages[name].needs,
                    when=spec.stages[name].when,
                    priority=spec.stages[name].priority,
                )
                for name in stage_order(spec)
            },
        )
    new = _apply(view, envelope.event, at)
    return replace(new, version=envelope.version, position=envelope.position, updated_at=at)


def stage_order(spec: PipelineSpec) -> list[str]:
    """The stages in dependency order, ties by name: deterministic whatever order the spec's mapping has
    (the log stores events as jsonb, which does not keep the order the user wrote the stages in)."""
    needs = {name: set(stage.needs) & spec.stages.keys() for name, stage in spec.stages.items()}
    ready = sorted(name for name, deps in needs.items() if not deps)
    order: list[str] = []
    while ready:
        name = heapq.heappop(ready)
        order.append(name)
        for other, deps in needs.items():
            if name in deps:
                deps.discard(name)
                if not deps:
                    heapq.heappush(ready, other)
    return order + sorted(spec.stages.keys() - set(order))  # a cycle (refused by validation): still shown


def _apply(view: PipelineView, event: AnyEvent, at: datetime) -> PipelineView:
    if getattr(event, "pipeline_id", view.id) != view.id:
        return view
    match event:
        case PipelineSubmitted():
            return view
        case PipelineCancelRequested():
            return view if view.terminal else replace(view, cancel_requested=True)
        case PipelineRetryRequested():
            return _retry(view, event)
        case PipelineSucceeded():
            return _finish(view, "succeeded", at, "", ())
        case PipelineFailed():
            return _finish(view, "failed", at, event.reason, event.failed_stages)
        case PipelineCancelled():
            return _finish(view, "cancelled", at, event.reason, ())
        case StagePending():
            stage = view.stages.get(event.stage)
            if stage is None or stage.status != "pending":
                return view
            return _put(view, replace(stage, pending_reason=event.reason))
        case StagePlaced():
            return _placed(view, event, at)
        case AttemptAccepted():
            return _touch(view, event.stage, event.attempt, at)
        case AttemptStarted():
            return _touch(view, event.stage, event.attempt, at, started=True)
        case AttemptProgressed():
            return _touch(view, event.stage, event.attempt, at, step=event.step, total_steps=event.total_steps)
        case CheckpointSaved():
            stage = view.stages.get(event.stage)
            if stage is None or stage.attempt(event.attempt) is None:
                return view
            if stage.checkpoint_step is not None and event.step < stage.checkpoint_step:
                return view
            return _put(view, replace(stage, checkpoint_step=event.step, checkpoint_path=event.path))
        case StageSucceeded():
            return _ended(
                view,
                event.stage,
                event.attempt,
                at,
                attempt_status="succeeded",
                stage_status="succeeded",
                exit_code=event.exit_code,
                outputs=event.outputs,
            )
        case StageFailed():
            return _ended(
                view,
                event.stage,
                event.attempt,
                at,
                attempt_status="failed",
                stage_status="failed",
                exit_code=event.exit_code,
                failure_class=event.failure_class,
                reason=event.reason or event.failure_class,
            )
        case AttemptLost():
            return _ended(
                view,
                event.stage,
                event.attempt,
                at,
                attempt_status="lost",
                stage_status="failed",
                failure_class="lost",
                reason=event.reason,
            )
        case StageRetryScheduled():
            stage = view.stages.get(event.stage)
            current = stage.current if stage is not None else None
            if stage is None or current is None or current.id != event.attempt or stage.status != "failed":
                return view
            not_before = utc(event.not_before)
            return _put(
                view,
                replace(
                    stage,
                    status="pending",
                    not_before=not_before,
                    pending_reason=f"attempt {event.next_attempt_number} waits for its retry backoff until "
                    f"{not_before.isoformat()}",
                    finished_at=None,
                ),
            )
        case StageSkipped():
            stage = view.stages.get(event.stage)
            if stage is None or stage.status != "pending":
                return view
            return _put(
                view,
                replace(
                    stage, status="skipped", reason=event.reason, finished_at=at, not_before=None, pending_reason=None
                ),
            )
        case StageCancelled():
            return _cancelled(view, event, at)
        case ReportRejected():
            return view  # audited in the log; it changes no state by definition
        case (
            AgentRegistered()
            | AgentDrainRequested()
            | AgentLost()
            | AgentDeregistered()
            | HostAdded()
            | HostRemoved()
            | HostProbed()
            | DatasetUploaded()
            | TokenCreated()
        ):
            return view
        case _:
            assert_never(event)


def utc(value: datetime) -> datetime:
    """The same instant in UTC (a naive time is taken as UTC): what a `timestamptz` column gives back."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _put(view: PipelineView, stage: StageView) -> PipelineView:
    return replace(view, stages={**view.stages, stage.name: stage})


def _put_attempt(stage: StageView, attempt: AttemptView) -> StageView:
    return replace(stage, attempts=tuple(attempt if a.id == attempt.id else a for a in stage.attempts))


def _finish(
    view: PipelineView, status: PipelineStatus, at: datetime, reason: str, failed: tuple[str, ...]
) -> PipelineView:
    if view.terminal:
        return view
    return replace(view, status=status, finished_at=at, reason=reason, failed_stages=failed)


def retry_targets(view: PipelineView, requested: Iterable[str] = ()) -> list[str]:
    """The stages a retry of `view` runs again, in pipeline order: the requested ones (default: every
    failed, cancelled or skipped stage) that did not succeed, and everything downstream of them (the
    stages skipped or cancelled because of them, and the `always`/`on_failure` ones such as a cleanup,
    which runs again after the new run). Succeeded stages elsewhere are kept."""
    listed = set(requested) or {n for n, s in view.stages.items() if s.status in RETRYABLE_STAGE_STATUSES}
    wanted = {n for n in listed if n in view.stages and view.stages[n].status in RETRYABLE_STAGE_STATUSES}
    users: dict[str, list[str]] = {name: [] for name in view.stages}
    for name, stage in view.stages.items():
        for dep in stage.needs:
            users.setdefault(dep, []).append(name)
    frontier = list(wanted)
    while frontier:
        for user in users.get(frontier.pop(), []):
            if user not in wanted:
                wanted.add(user)
                frontier.append(user)
    return [n for n in view.stages if n in wanted]


def _retry(view: PipelineView, event: PipelineRetryRequested) -> PipelineView:
    if view.status not in ("failed", "cancelled"):
        return view  # only an ended, unsuccessful pipeline is retried; a duplicate request is a no-op
    stages = dict(view.stages)
    for name in retry_targets(view, event.stages):
        if stages[name].status == "pending":
            continue
        stages[name] = replace(
            stages[name], status="pending", reason="", pending_reason=None, not_before=None, finished_at=None
        )
    return replace(
        view,
        stages=stages,
        status="pending",
        finished_at=None,
        reason="",
        failed_stages=(),
        cancel_requested=False,
        retries=view.retries + 1,
    )


def _placed(view: PipelineView, event: StagePlaced, at: datetime) -> PipelineView:
    stage = view.stages.get(event.stage)
    if stage is None or view.terminal or stage.status != "pending" or stage.attempt(event.attempt) is not None:
        return view
    attempt = AttemptView(
        id=event.attempt,
        number=event.attempt_number,
        agent=event.agent,
        gpus=event.gpus,
        placed_at=at,
        resumed_from_step=event.resume_from_step,
        resume_from_path=event.resume_from_path,
    )
    stage = replace(
        stage,
        status="running",
        attempts=(*stage.attempts, attempt),
        pending_reason=None,
        not_before=None,
        reason="",
    )
    new = _put(view, stage)
    return replace(new, status="running") if new.status == "pending" else new


def _touch(
    view: PipelineView,
    stage_name: str,
    attempt_id: str,
    at: datetime,
    *,
    started: bool = False,
    step: int | None = None,
    total_steps: int | None = None,
) -> PipelineView:
    stage = view.stages.get(stage_name)
    attempt = stage.attempt(attempt_id) if stage is not None else None
    if stage is None or attempt is None or attempt.status not in ATTEMPT_ACTIVE:
        return view
    status: AttemptStatus = attempt.status
    if started or step is not None:
        status = "running"
    elif status == "placed":
        status = "accepted"
    updated = replace(
        attempt,
        status=status,
        started_at=attempt.started_at or (at if status == "running" else None),
        step=max(attempt.step or 0, step) if step is not None else attempt.step,
        total_steps=total_steps if total_steps is not None else attempt.total_steps,
    )
    return view if updated == attempt else _put(view, _put_attempt(stage, updated))


def _ended(
    view: PipelineView,
    stage_name: str,
    attempt_id: str,
    at: datetime,
    *,
    attempt_status: AttemptStatus,
    stage_status: StageStatus,
    exit_code: int | None = None,
    failure_class: str | None = None,
    reason: str = "",
    outputs: dict[str, Any] | None = None,
) -> PipelineView:
    """Only the stage's current, still active attempt can end it (stale attempts are fenced off)."""
    stage = view.stages.get(stage_name)
    current = stage.current if stage is not None else None
    if stage is None or current is None or current.id != attempt_id or current.status not in ATTEMPT_ACTIVE:
        return view
    attempt = replace(
        current, status=attempt_status, finished_at=at, exit_code=exit_code, failure_class=failure_class, reason=reason
    )
    stage = replace(
        _put_attempt(stage, attempt),
        status=stage_status,
        finished_at=at,
        reason=reason,
        outputs=outputs if outputs is not None else stage.outputs,
    )
    return _put(view, stage)


def _cancelled(view: PipelineView, event: StageCancelled, at: datetime) -> PipelineView:
    stage = view.stages.get(event.stage)
    if stage is None:
        return view
    if event.attempt is not None:
        current = stage.current
        if current is None or current.id != event.attempt or current.status not in ATTEMPT_ACTIVE:
            return view
        stage = _put_attempt(stage, replace(current, status="cancelled", finished_at=at, reason=event.reason))
    elif stage.status not in ("pending", "failed") or (
        stage.current is not None and stage.current.status in ATTEMPT_ACTIVE
    ):
        return view
    return _put(
        view,
        replace(stage, status="cancelled", reason=event.reason, finished_at=at, not_before=None, pending_reason=None),
    )


# ---- tokens -------------------------------------------------------------------------------------------


def token_view(envelope: Envelope) -> TokenView | None:
    """The token a `token.created` envelope records; None for any other event."""
    event = envelope.event
    if not isinstance(event, TokenCreated):
        return None
    return TokenView(
        id=event.token_id,
        name=event.name,
        role=event.role,
        created_at=envelope.recorded_at,
        created_by=envelope.actor,
        position=envelope.position,
    )


# ---- batches and diffs --------------------------------------------------------------------------------


class Projection(msgspec.Struct, kw_only=True):
    """Every read model, in memory: what a full replay of the log builds (and what verify compares)."""

    pipelines: dict[str, PipelineView] = {}
    tokens: dict[str, TokenView] = {}
    position: int = 0

    def apply(self, envelope: Envelope) -> None:
        pipeline_id = pipeline_id_of(envelope.stream_id)
        if pipeline_id is not None:
            view = evolve(self.pipelines.get(pipeline_id), envelope)
            if view is not None:
                self.pipelines[pipeline_id] = view
        else:
            token = token_view(envelope)
            if token is not None and token.id not in self.tokens:
                self.tokens[token.id] = token
        self.position = max(self.position, envelope.position)


def project_batch(
    loaded: Mapping[str, PipelineView], envelopes: Iterable[Envelope]
) -> tuple[dict[str, PipelineView], list[TokenView]]:
    """Apply a batch to the stored views it touches: the new views by id, and the tokens created."""
    views: dict[str, PipelineView] = {}
    tokens: list[TokenView] = []
    for envelope in envelopes:
        pipeline_id = pipeline_id_of(envelope.stream_id)
        if pipeline_id is not None:
            before = views.get(pipeline_id) or loaded.get(pipeline_id)
            after = evolve(before, envelope)
            if after is not None:
                views[pipeline_id] = after
        else:
            token = token_view(envelope)
            if token is not None:
                tokens.append(token)
    return views, tokens


def diff(before: PipelineView | None, after: PipelineView) -> list[RowChange]:
    """The rows to upsert so the stored `before` becomes `after` (unchanged stages/attempts are skipped)."""
    changes: list[RowChange] = []
    if before is None or _pipeline_fields(before) != _pipeline_fields(after):
        changes.append(PipelineRow(view=after))
    for ordinal, (name, stage) in enumerate(after.stages.items()):
        old = before.stages.get(name) if before is not None else None
        if old is not None and old == stage:
            continue
        if old is None or replace(old, attempts=()) != replace(stage, attempts=()):
            changes.append(StageRow(pipeline_id=after.id, ordinal=ordinal, stage=stage))
        old_attempts = {a.id: a for a in old.attempts} if old is not None else {}
        for index, attempt in enumerate(stage.attempts):
            if old_attempts.get(attempt.id) != attempt:
                changes.append(AttemptRow(pipeline_id=after.id, stage=name, ordinal=index, attempt=attempt))
    return changes


def _pipeline_fields(view: PipelineView) -> PipelineView:
    return replace(view, stages={})
