"""Pure core: fold a pipeline's events into `PipelineState`, and an agent's into `AgentState`.

`evolve` is a reducer: it never raises on a stale or unknown stage/attempt (the event changes
nothing) and is idempotent. Given an `Envelope`, it skips versions it has already applied (so a
snapshot folded with an overlapping tail equals the full fold) and takes times from `recorded_at`;
given a bare event (as `decide` does internally), it applies identity rules: an attempt already
known, finished or replaced is left alone, so a duplicated event changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
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


# The states are `gc=False`: a fold makes a new one per event (a million at a start-up load, bench R1)
# and, tracked, they made gen-2 collections a quarter of the fold's time. Safe because a frozen state is
# built from values that existed before it and never point back at it, so no cycle can run through one
# (tests/unit/test_fold_gc.py).
class AttemptState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
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


class StageState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
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


class PipelineState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
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
        if state is None:
            return _start(item.event, item.recorded_at, item.position, item.version)
        version = item.version
        if version <= state.version:
            return state  # already applied (a duplicate delivery, or a tail overlapping a snapshot)
        event, at = item.event, item.recorded_at
    elif state is None:
        return _start(item, None, None, 0)
    else:
        event, at, version = item, None, state.version
    if getattr(event, "pipeline_id", state.pipeline_id) != state.pipeline_id:
        new = state
    else:
        handler = _HANDLERS.get(type(event)) or _handler_for(event)
        new = handler(state, event, at, version)
    # Handlers stamp `version` into the one copy they make; one that changes nothing hands back
    # `state` as it was, which must still record that this version was applied.
    return new if new.version == version else replace(new, version=version)


def _start(event: AnyEvent, at: datetime | None, position: int | None, version: int) -> PipelineState:
    if isinstance(event, PipelineSubmitted):
        return PipelineState(
            pipeline_id=event.pipeline_id,
            spec=event.spec,
            stages={name: StageState(name=name) for name in event.spec.stages},
            version=version,
            submitted_position=position,
            created_at=at,
        )
    raise FoldError(f"a pipeline stream must start with pipeline.submitted, not {type(event).__name__}")


_Handler = Callable[[PipelineState, Any, "datetime | None", int], PipelineState]
"""(state, event, recorded_at, version) -> the new state, carrying `version` (or `state` unchanged)."""

_HANDLERS: dict[type, _Handler] = {}
"""Event type -> its handler: `_handler_for` memoised, so each event costs one lookup, not a walk
down the match's class patterns."""


def _handler_for(event: AnyEvent) -> _Handler:
    """The handler of `event`'s type (and remember it): the exhaustive list of what each event does."""
    handler: _Handler
    match event:
        case StagePlaced():
            handler = _placed
        case AttemptAccepted() | AttemptStarted() | AttemptProgressed():
            handler = _touch
        case StageSucceeded():
            handler = _succeeded
        case StageFailed():
            handler = _failed
        case AttemptLost():
            handler = _lost
        case CheckpointSaved():
            handler = _checkpoint
        case StagePending():
            handler = _pending
        case StageRetryScheduled():
            handler = _retry_scheduled
        case StageSkipped():
            handler = _skipped
        case StageCancelled():
            handler = _cancelled
        case PipelineCancelRequested():
            handler = _cancel_requested
        case PipelineRetryRequested():
            handler = _retry
        case PipelineSucceeded() | PipelineFailed() | PipelineCancelled():
            handler = _finish
        case PipelineSubmitted():
            handler = _unchanged  # a duplicate submission changes nothing
        case ReportRejected():
            handler = _unchanged  # audited in the log; it changes no state by definition
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
            handler = _unchanged  # not pipeline events
        case _:
            assert_never(event)
    _HANDLERS[type(event)] = handler
    return handler


def _unchanged(state: PipelineState, event: AnyEvent, at: datetime | None, version: int) -> PipelineState:
    return state


def _put(state: PipelineState, stage: StageState, version: int) -> PipelineState:
    # A shallow copy of the small stage map shares every other stage (they are immutable); it is
    # cheaper than `{**stages, name: stage}`, which builds the dict through the generic merge path.
    stages = state.stages.copy()
    stages[stage.name] = stage
    return replace(state, stages=stages, version=version)


def _put_attempt(stage: StageState, attempt: AttemptState) -> StageState:
    attempts = stage.attempts
    if attempts and attempts[-1].id == attempt.id:  # nearly always the current attempt
        return replace(stage, attempts=(*attempts[:-1], attempt))
    return replace(stage, attempts=tuple(attempt if a.id == attempt.id else a for a in attempts))


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    # Not `max(a, b)`: the builtin's generic call costs several times one comparison, per report.
    return b if b > a else a


def _pending(state: PipelineState, event: StagePending, at: datetime | None, version: int) -> PipelineState:
    stage = state.stages.get(event.stage)
    if stage is None or stage.status != "pending" or stage.pending_reason == event.reason:
        return state
    return _put(state, replace(stage, pending_reason=event.reason), version)


def _cancel_requested(
    state: PipelineState, event: PipelineCancelRequested, at: datetime | None, version: int
) -> PipelineState:
    if state.terminal or state.cancel_requested:
        return state
    return replace(state, cancel_requested=True, cancel_reason=event.reason, version=version)


def _finish(
    state: PipelineState,
    event: PipelineSucceeded | PipelineFailed | PipelineCancelled,
    at: datetime | None,
    version: int,
) -> PipelineState:
    if state.terminal:
        return state
    if isinstance(event, PipelineSucceeded):
        return replace(state, status="succeeded", finished_at=at, reason="", failed_stages=(), version=version)
    if isinstance(event, PipelineFailed):
        return replace(
            state,
            status="failed",
            finished_at=at,
            reason=event.reason,
            failed_stages=event.failed_stages,
            version=version,
        )
    return replace(state, status="cancelled", finished_at=at, reason=event.reason, failed_stages=(), version=version)


def _retry(state: PipelineState, event: PipelineRetryRequested, at: datetime | None, version: int) -> PipelineState:
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
        version=version,
    )


def _placed(state: PipelineState, event: StagePlaced, at: datetime | None, version: int) -> PipelineState:
    stage = state.stages.get(event.stage)
    if (
        stage is None
        or stage.status != "pending"
        or state.status in PIPELINE_TERMINAL
        or stage.attempt(event.attempt) is not None
    ):
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
    stages = state.stages.copy()
    stages[stage.name] = stage
    # Not terminal (checked above), so the pipeline was pending or already running.
    return replace(state, stages=stages, status="running", version=version)


def _touch(
    state: PipelineState,
    event: AttemptAccepted | AttemptStarted | AttemptProgressed,
    at: datetime | None,
    version: int,
) -> PipelineState:
    """An accepted/started/progress report: the attempt is alive (and, once started, running)."""
    stage = state.stages.get(event.stage)
    if stage is None:
        return state
    attempts = stage.attempts
    if not attempts:
        return state
    attempt = attempts[-1]  # reports nearly always name the current attempt
    if attempt.id != event.attempt:
        attempt = stage.attempt(event.attempt)
        if attempt is None:
            return state
    if attempt.status not in ATTEMPT_ACTIVE:
        return state
    step, total_steps = attempt.step, attempt.total_steps
    # `type(...) is`, not isinstance: a miss on a msgspec Struct class goes through its metaclass's
    # instance check, several times the cost of this whole comparison (and this runs per report).
    if type(event) is AttemptProgressed:
        status: AttemptStatus = "running"
        step = max(step or 0, event.step)
        if event.total_steps is not None:
            total_steps = event.total_steps
    elif type(event) is AttemptStarted:
        status = "running"
    else:
        status = "accepted" if attempt.status == "placed" else attempt.status
    accepted_at = attempt.accepted_at or at
    started_at = attempt.started_at or (at if status == "running" else None)
    seen = attempt.last_seen_at  # `_latest(seen, at)`, inline
    last_seen_at = seen if at is None or (seen is not None and seen >= at) else at
    # A duplicate report changes nothing: compare the fields it could set, not the whole attempt.
    if (
        attempt.was_accepted
        and status == attempt.status
        and accepted_at == attempt.accepted_at
        and started_at == attempt.started_at
        and last_seen_at == attempt.last_seen_at
        and step == attempt.step
        and total_steps == attempt.total_steps
    ):
        return state
    updated = replace(
        attempt,
        status=status,
        was_accepted=True,
        accepted_at=accepted_at,
        started_at=started_at,
        last_seen_at=last_seen_at,
        step=step,
        total_steps=total_steps,
    )
    if attempt is not attempts[-1]:
        return _put(state, _put_attempt(stage, updated), version)
    # The current attempt, inline (`_put_attempt` then `_put`): this runs for most events of a log.
    stages = state.stages.copy()
    stages[stage.name] = replace(stage, attempts=(*attempts[:-1], updated))
    return replace(state, stages=stages, version=version)


def _checkpoint(state: PipelineState, event: CheckpointSaved, at: datetime | None, version: int) -> PipelineState:
    stage = state.stages.get(event.stage)
    attempt = stage.attempt(event.attempt) if stage is not None else None
    if stage is None or attempt is None:
        return state
    if stage.checkpoint_step is None or event.step >= stage.checkpoint_step:
        stage = replace(stage, checkpoint_step=event.step, checkpoint_path=event.path)
    if attempt.active:
        stage = _put_attempt(stage, replace(attempt, last_seen_at=_latest(attempt.last_seen_at, at)))
    return _put(state, stage, version)


def _succeeded(state: PipelineState, event: StageSucceeded, at: datetime | None, version: int) -> PipelineState:
    return _ended(
        state,
        event.stage,
        event.attempt,
        at,
        version,
        attempt_status="succeeded",
        stage_status="succeeded",
        exit_code=event.exit_code,
        outputs=event.outputs,
    )


def _failed(state: PipelineState, event: StageFailed, at: datetime | None, version: int) -> PipelineState:
    return _ended(
        state,
        event.stage,
        event.attempt,
        at,
        version,
        attempt_status="failed",
        stage_status="failed",
        exit_code=event.exit_code,
        failure_class=event.failure_class,
        reason=event.reason or event.failure_class,
    )


def _lost(state: PipelineState, event: AttemptLost, at: datetime | None, version: int) -> PipelineState:
    return _ended(
        state,
        event.stage,
        event.attempt,
        at,
        version,
        attempt_status="lost",
        stage_status="failed",
        failure_class="lost",
        reason=event.reason,
    )


def _ended(
    state: PipelineState,
    stage_name: str,
    attempt_id: str,
    at: datetime | None,
    version: int,
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
    if stage is None or not stage.attempts:
        return state
    attempts = stage.attempts
    current = attempts[-1]
    if current.id != attempt_id or current.status not in ATTEMPT_ACTIVE:
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
        stage,
        attempts=(*attempts[:-1], attempt),
        status=stage_status,
        finished_at=at,
        reason=reason,
        outputs=outputs if outputs is not None else stage.outputs,
    )
    stages = state.stages.copy()
    stages[stage_name] = stage
    return replace(state, stages=stages, version=version)


def _retry_scheduled(
    state: PipelineState, event: StageRetryScheduled, at: datetime | None, version: int
) -> PipelineState:
    stage = state.stages.get(event.stage)
    current = stage.current if stage is not None else None
    if stage is None or current is None or current.id != event.attempt or stage.status != "failed":
        return state
    stage = replace(stage, status="pending", not_before=event.not_before, retry_of=event.attempt, finished_at=None)
    return _put(state, stage, version)


def _skipped(state: PipelineState, event: StageSkipped, at: datetime | None, version: int) -> PipelineState:
    stage = state.stages.get(event.stage)
    if stage is None or stage.status != "pending":
        return state
    stage = replace(stage, status="skipped", reason=event.reason, finished_at=at, not_before=None)
    return _put(state, stage, version)


def _cancelled(state: PipelineState, event: StageCancelled, at: datetime | None, version: int) -> PipelineState:
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
    stage = replace(stage, status="cancelled", reason=event.reason, finished_at=at, not_before=None)
    return _put(state, stage, version)


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
