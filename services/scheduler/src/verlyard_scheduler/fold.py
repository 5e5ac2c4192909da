"""Pure core: fold a pipeline's events into `PipelineState`, and an agent's into `AgentState`.

`evolve` is a reducer: it never raises on a stale or unknown stage/attempt (the event changes
nothing) and is idempotent. Given an `Envelope`, it skips versions it has already applied (so a
snapshot folded with an overlapping tail equals the full fold) and takes times from `recorded_at`;
given a bare event (as `decide` does internally), it applies identity rules: an attempt already
known, finished or replaced is left alone, so a duplicated event changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, Literal, assert_never

import msgspec
from msgspec.structs import replace

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
    GpuInfo,
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
from verlyard_shared.spec import PipelineSpec, StageSpec

PipelineStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]
StageStatus = Literal["pending", "running", "succeeded", "failed", "skipped", "cancelled"]
AttemptStatus = Literal["placed", "accepted", "running", "succeeded", "failed", "lost", "cancelled"]
AgentStatus = Literal["active", "draining", "lost", "gone"]

PIPELINE_TERMINAL: Final = frozenset({"succeeded", "failed", "cancelled"})
ATTEMPT_ACTIVE: Final = frozenset({"placed", "accepted", "running"})
RETRYABLE_STAGE_STATUSES: Final = frozenset({"failed", "cancelled", "skipped"})


class FoldError(ValueError):
    """The stream cannot be folded: it does not start with `pipeline.submitted`."""


class AttemptState(msgspec.Struct, frozen=True, kw_only=True):
    """One try of a stage on one agent."""

    id: str
    number: int
    agent: str
    status: AttemptStatus = "placed"
    gpus: tuple[int, ...] = ()
    cpu_slots: int = 1
    placed_at: datetime | None = None
    accepted_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    last_seen_at: datetime | None = None
    """When the newest event derived from this attempt's reports was recorded (a lease renewal)."""
    lease_expires_at: datetime | None = None
    """From `stage.placed`: the deadline for the agent to accept (schedule-to-start)."""
    was_accepted: bool = False
    """The agent took the attempt: it counts against the retry budget."""
    exit_code: int | None = None
    failure_class: str | None = None
    reason: str = ""
    resumed_from_step: int | None = None
    resume_from_path: str | None = None
    step: int | None = None
    total_steps: int | None = None
    placement: dict[str, Any] = {}

    @property
    def active(self) -> bool:
        return self.status in ATTEMPT_ACTIVE


class StageState(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    status: StageStatus = "pending"
    attempts: tuple[AttemptState, ...] = ()
    reason: str = ""
    """Why the stage failed, was skipped or was cancelled."""
    pending_reason: str | None = None
    """The scheduler's latest answer to "why is this stage not placed?" (`stage.pending`)."""
    not_before: datetime | None = None
    """A scheduled retry waits until then (backoff)."""
    retry_of: str | None = None
    """The attempt whose failure the scheduled retry follows."""
    budget_from: int = 0
    """Attempts before this index do not count against the retry budget (a retry request resets it)."""
    outputs: dict[str, Any] = {}
    checkpoint_step: int | None = None
    checkpoint_path: str | None = None
    """The latest checkpoint recorded for the stage, over all its attempts (a retry resumes from it)."""
    finished_at: datetime | None = None

    @property
    def current(self) -> AttemptState | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def active_attempt(self) -> AttemptState | None:
        current = self.current
        return current if current is not None and current.active else None

    def attempt(self, attempt_id: str) -> AttemptState | None:
        for attempt in self.attempts:
            if attempt.id == attempt_id:
                return attempt
        return None


class PipelineState(msgspec.Struct, frozen=True, kw_only=True):
    pipeline_id: str
    spec: PipelineSpec
    stages: dict[str, StageState]
    status: PipelineStatus = "pending"
    version: int = 0
    """The stream version last applied from an envelope (0 when folded from bare events only)."""
    submitted_position: int | None = None
    """Global position of `pipeline.submitted`: the FIFO order of placement."""
    created_at: datetime | None = None
    finished_at: datetime | None = None
    cancel_requested: bool = False
    cancel_reason: str = ""
    reason: str = ""
    """Why the pipeline failed or was cancelled."""
    failed_stages: tuple[str, ...] = ()
    retries: int = 0
    """How many retry requests were applied."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def terminal(self) -> bool:
        return self.status in PIPELINE_TERMINAL

    def stage_spec(self, stage: str) -> StageSpec:
        return self.spec.stages[stage]


def fold(events: list[Envelope] | list[AnyEvent], state: PipelineState | None = None) -> PipelineState:
    """Fold a whole stream (or a tail onto a snapshot)."""
    for item in events:
        state = evolve(state, item)
    if state is None:
        raise FoldError("an empty stream has no pipeline state")
    return state


def evolve(state: PipelineState | None, item: Envelope | AnyEvent) -> PipelineState:
    """Apply one event (bare, or in its envelope) to a pipeline's state; see the module docstring."""
    if isinstance(item, Envelope):
        if state is not None and item.version <= state.version:
            return state  # already applied (a duplicate delivery, or a tail overlapping a snapshot)
        new = _apply(state, item.event, item.recorded_at, item.position)
        return new if new.version == item.version else replace(new, version=item.version)
    return _apply(state, item, None, None)


def _apply(state: PipelineState | None, event: AnyEvent, at: datetime | None, position: int | None) -> PipelineState:
    if state is None:
        if isinstance(event, PipelineSubmitted):
            return PipelineState(
                pipeline_id=event.pipeline_id,
                spec=event.spec,
                stages={name: StageState(name=name) for name in event.spec.stages},
                submitted_position=position,
                created_at=at,
            )
        raise FoldError(f"a pipeline stream must start with pipeline.submitted, not {type(event).__name__}")
    if getattr(event, "pipeline_id", state.pipeline_id) != state.pipeline_id:
        return state
    # The most frequent events first: a match tries its class patterns in order.
    match event:
        case StagePlaced():
            return _placed(state, event, at)
        case AttemptAccepted():
            return _touch(state, event.stage, event.attempt, at, accepted=True)
        case AttemptStarted():
            return _touch(state, event.stage, event.attempt, at, accepted=True, started=True)
        case AttemptProgressed():
            return _touch(state, event.stage, event.attempt, at, step=event.step, total_steps=event.total_steps)
        case PipelineSubmitted():
            return state  # a duplicate submission changes nothing
        case PipelineCancelRequested():
            if state.terminal or state.cancel_requested:
                return state
            return replace(state, cancel_requested=True, cancel_reason=event.reason)
        case PipelineRetryRequested():
            return _retry(state, event)
        case PipelineSucceeded():
            return _finish(state, "succeeded", at, "", ())
        case PipelineFailed():
            return _finish(state, "failed", at, event.reason, event.failed_stages)
        case PipelineCancelled():
            return _finish(state, "cancelled", at, event.reason, ())
        case StagePending():
            stage = state.stages.get(event.stage)
            if stage is None or stage.status != "pending" or stage.pending_reason == event.reason:
                return state
            return _put(state, replace(stage, pending_reason=event.reason))
        case CheckpointSaved():
            return _checkpoint(state, event, at)
        case StageSucceeded():
            return _ended(
                state,
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
                state,
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
                state,
                event.stage,
                event.attempt,
                at,
                attempt_status="lost",
                stage_status="failed",
                failure_class="lost",
                reason=event.reason,
            )
        case StageRetryScheduled():
            stage = state.stages.get(event.stage)
            current = stage.current if stage is not None else None
            if stage is None or current is None or current.id != event.attempt or stage.status != "failed":
                return state
            return _put(
                state,
                replace(stage, status="pending", not_before=event.not_before, retry_of=event.attempt, finished_at=None),
            )
        case StageSkipped():
            stage = state.stages.get(event.stage)
            if stage is None or stage.status != "pending":
                return state
            return _put(state, replace(stage, status="skipped", reason=event.reason, finished_at=at, not_before=None))
        case StageCancelled():
            return _cancelled(state, event, at)
        case ReportRejected():
            return state  # audited in the log; it changes no state by definition
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
            return state  # not pipeline events
        case _:
            assert_never(event)


def _put(state: PipelineState, stage: StageState) -> PipelineState:
    return replace(state, stages={**state.stages, stage.name: stage})


def _put_attempt(stage: StageState, attempt: AttemptState) -> StageState:
    attempts = stage.attempts
    if attempts and attempts[-1].id == attempt.id:  # nearly always the current attempt
        return replace(stage, attempts=(*attempts[:-1], attempt))
    return replace(stage, attempts=tuple(attempt if a.id == attempt.id else a for a in attempts))


def _finish(
    state: PipelineState, status: PipelineStatus, at: datetime | None, reason: str, failed: tuple[str, ...]
) -> PipelineState:
    if state.terminal:
        return state
    return replace(state, status=status, finished_at=at, reason=reason, failed_stages=failed)


def _retry(state: PipelineState, event: PipelineRetryRequested) -> PipelineState:
    # Only an ended, unsuccessful pipeline can be retried; this also makes a duplicate request a no-op.
    if state.status not in ("failed", "cancelled"):
        return state
    listed = set(event.stages) or {n for n, s in state.stages.items() if s.status in RETRYABLE_STAGE_STATUSES}
    wanted = {n for n in listed if n in state.stages and state.stages[n].status in RETRYABLE_STAGE_STATUSES}
    # Everything downstream of a re-run stage runs again with it: the stages skipped or cancelled
    # because of it, and the `always`/`on_failure` ones that ran after the failure (a cleanup
    # cleans up after the new run). Succeeded stages elsewhere are kept.
    users: dict[str, list[str]] = {name: [] for name in state.stages}
    for name, spec in state.spec.stages.items():
        for dep in spec.needs:
            users.setdefault(dep, []).append(name)
    frontier = list(wanted)
    while frontier:
        for user in users.get(frontier.pop(), []):
            if user not in wanted:
                wanted.add(user)
                frontier.append(user)
    stages = dict(state.stages)
    for name in wanted:
        stage = stages[name]
        if stage.status == "pending":
            continue
        stages[name] = replace(
            stage,
            status="pending",
            reason="",
            pending_reason=None,
            not_before=None,
            retry_of=None,
            budget_from=len(stage.attempts),
            finished_at=None,
        )
    return replace(
        state,
        stages=stages,
        status="pending",
        finished_at=None,
        reason="",
        failed_stages=(),
        cancel_requested=False,
        cancel_reason="",
        retries=state.retries + 1,
    )


def _placed(state: PipelineState, event: StagePlaced, at: datetime | None) -> PipelineState:
    stage = state.stages.get(event.stage)
    if stage is None or state.terminal or stage.status != "pending" or stage.attempt(event.attempt) is not None:
        return state
    attempt = AttemptState(
        id=event.attempt,
        number=event.attempt_number,
        agent=event.agent,
        gpus=event.gpus,
        cpu_slots=event.cpu_slots,
        placed_at=at,
        lease_expires_at=event.lease_expires_at,
        resumed_from_step=event.resume_from_step,
        resume_from_path=event.resume_from_path,
        placement=event.placement,
    )
    stage = replace(
        stage,
        status="running",
        attempts=(*stage.attempts, attempt),
        pending_reason=None,
        not_before=None,
        retry_of=None,
        reason="",
    )
    new = _put(state, stage)
    return replace(new, status="running") if new.status == "pending" else new


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _touch(
    state: PipelineState,
    stage_name: str,
    attempt_id: str,
    at: datetime | None,
    *,
    accepted: bool = False,
    started: bool = False,
    step: int | None = None,
    total_steps: int | None = None,
) -> PipelineState:
    """An accepted/started/progress report: the attempt is alive (and, for progress, running)."""
    stage = state.stages.get(stage_name)
    attempt = stage.attempt(attempt_id) if stage is not None else None
    if stage is None or attempt is None or not attempt.active:
        return state
    status: AttemptStatus = attempt.status
    if started or step is not None:
        status = "running"
    elif accepted and status == "placed":
        status = "accepted"
    updated = replace(
        attempt,
        status=status,
        was_accepted=True,
        accepted_at=attempt.accepted_at or at,
        started_at=attempt.started_at or (at if status == "running" else None),
        last_seen_at=_latest(attempt.last_seen_at, at),
        step=max(attempt.step or 0, step) if step is not None else attempt.step,
        total_steps=total_steps if total_steps is not None else attempt.total_steps,
    )
    return state if updated == attempt else _put(state, _put_attempt(stage, updated))


def _checkpoint(state: PipelineState, event: CheckpointSaved, at: datetime | None) -> PipelineState:
    stage = state.stages.get(event.stage)
    attempt = stage.attempt(event.attempt) if stage is not None else None
    if stage is None or attempt is None:
        return state
    if stage.checkpoint_step is None or event.step >= stage.checkpoint_step:
        stage = replace(stage, checkpoint_step=event.step, checkpoint_path=event.path)
    if attempt.active:
        stage = _put_attempt(stage, replace(attempt, last_seen_at=_latest(attempt.last_seen_at, at)))
    return _put(state, stage)


def _ended(
    state: PipelineState,
    stage_name: str,
    attempt_id: str,
    at: datetime | None,
    *,
    attempt_status: AttemptStatus,
    stage_status: StageStatus,
    exit_code: int | None = None,
    failure_class: str | None = None,
    reason: str = "",
    outputs: dict[str, Any] | None = None,
) -> PipelineState:
    """An attempt ended: only the stage's current, still active attempt can end it (fencing)."""
    stage = state.stages.get(stage_name)
    current = stage.current if stage is not None else None
    if stage is None or current is None or current.id != attempt_id or not current.active:
        return state
    attempt = replace(
        current,
        status=attempt_status,
        finished_at=at,
        exit_code=exit_code,
        failure_class=failure_class,
        reason=reason,
    )
    stage = replace(
        _put_attempt(stage, attempt),
        status=stage_status,
        finished_at=at,
        reason=reason,
        outputs=outputs if outputs is not None else stage.outputs,
    )
    return _put(state, stage)


def _cancelled(state: PipelineState, event: StageCancelled, at: datetime | None) -> PipelineState:
    stage = state.stages.get(event.stage)
    if stage is None:
        return state
    if event.attempt is not None:
        current = stage.current
        if current is None or current.id != event.attempt or not current.active:
            return state
        stage = _put_attempt(stage, replace(current, status="cancelled", finished_at=at, reason=event.reason))
    elif stage.status not in ("pending", "failed") or stage.active_attempt is not None:
        return state
    return _put(state, replace(stage, status="cancelled", reason=event.reason, finished_at=at, not_before=None))


# ---- agents (stream `agent-<id>`) --------------------------------------------------------------------


class AgentState(msgspec.Struct, frozen=True, kw_only=True):
    """An agent as registered: its inventory, labels and whether it takes new work."""

    agent: str
    hostname: str
    gpus: tuple[GpuInfo, ...] = ()
    cpu_slots: int = 1
    labels: dict[str, str] = {}
    version: str = ""
    status: AgentStatus = "active"
    reason: str = ""
    registered_at: datetime | None = None
    stream_version: int = 0


def evolve_agent(state: AgentState | None, item: Envelope | AnyEvent) -> AgentState | None:
    """Apply one event to an agent's state (None until it registers)."""
    if isinstance(item, Envelope):
        if state is not None and item.version <= state.stream_version:
            return state
        new = _apply_agent(state, item.event, item.recorded_at)
        return replace(new, stream_version=item.version) if new is not None else None
    return _apply_agent(state, item, None)


def _apply_agent(state: AgentState | None, event: AnyEvent, at: datetime | None) -> AgentState | None:
    if isinstance(event, AgentRegistered):
        # A (re-)registration brings the agent back into service with its current inventory.
        return AgentState(
            agent=event.agent,
            hostname=event.hostname,
            gpus=event.gpus,
            cpu_slots=event.cpu_slots,
            labels=event.labels,
            version=event.version,
            registered_at=at if at is not None else (state.registered_at if state is not None else None),
            stream_version=state.stream_version if state is not None else 0,
        )
    if state is None or getattr(event, "agent", None) != state.agent:
        return state
    if isinstance(event, AgentDrainRequested):
        return replace(state, status="draining", reason=event.reason) if state.status == "active" else state
    if isinstance(event, AgentLost):
        return replace(state, status="lost", reason=event.reason) if state.status != "gone" else state
    if isinstance(event, AgentDeregistered):
        return replace(state, status="gone", reason=event.reason)
    return state
