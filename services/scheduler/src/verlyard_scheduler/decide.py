"""Pure core: from a pipeline's folded state and the time, decide the events to append and the intents.

`decide` iterates to a fixed point: the events it returns are applied to its own copy of the state
until nothing more follows (one failure can skip a chain and end the pipeline in one call), then the
intents are read off the final state. It is deterministic: time, leases and jitter are inputs.

Rules (docs: interface.md, issue 3):
- a stage is ready when its `needs` allow it: `on_success` all succeeded; `always` all finished;
  `on_failure` all finished and the pipeline has a failure (skipped when nothing failed and nothing
  else is in flight). An `on_success` stage whose dependency failed, was skipped or was cancelled is
  skipped with that reason.
- a failed attempt is retried when its failure class is in `retry_on` and the stage has used fewer
  than `max_attempts` (counted from events since the last retry request), after a fixed or
  exponential backoff with optional full jitter. An attempt no agent accepted before its deadline is
  re-queued at once without using the budget (up to `MAX_FREE_REQUEUES` times).
- an active attempt whose lease passed is lost; one that ran past the stage's timeout fails with
  class `timeout`; both get a cancel command (the agent may still be alive).
- a cancel request cancels pending stages, sends running attempts a cancel, and ends the pipeline
  `cancelled` once nothing runs.
- the pipeline ends when every stage is final: `failed` (naming the failed stages), else `succeeded`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping
from datetime import datetime, timedelta
from typing import Final, Literal

import msgspec

from verlyard_scheduler.dag import ancestors, needs_of, topological_order
from verlyard_scheduler.fold import AttemptState, PipelineState, StageState, evolve
from verlyard_scheduler.placement import Placement, ReadyStage, Unplaceable
from verlyard_shared.commands import CancelAttempt, RunStage
from verlyard_shared.events import (
    AttemptLost,
    PipelineCancelled,
    PipelineCancelRequested,
    PipelineFailed,
    PipelineRetryRequested,
    PipelineSucceeded,
    StageCancelled,
    StageFailed,
    StagePending,
    StagePlaced,
    StageRetryScheduled,
    StageSkipped,
)

__all__ = [
    "MAX_FREE_REQUEUES",
    "Decision",
    "DecisionEvent",
    "ReadyStage",
    "SendCommand",
    "cancel_command",
    "cancel_request",
    "decide",
    "describe_pending",
    "lease_expiry",
    "next_deadline",
    "pending_event",
    "placed_event",
    "retry_request",
    "run_command",
]

MAX_FREE_REQUEUES: Final = 5
"""Attempts lost before any agent accepted them are re-queued without using the retry budget, this often."""


class SendCommand(msgspec.Struct, frozen=True, kw_only=True):
    """Publish this command after the decision's events are committed (its id dedupes re-sends)."""

    command: RunStage | CancelAttempt


DecisionEvent = (
    AttemptLost
    | StageFailed
    | StageRetryScheduled
    | StageSkipped
    | StageCancelled
    | PipelineSucceeded
    | PipelineFailed
    | PipelineCancelled
)
Decision = DecisionEvent | SendCommand | ReadyStage


class _Ctx:
    def __init__(
        self,
        now: datetime,
        leases: Mapping[str, datetime],
        dead_agents: frozenset[str],
        lease_s: float,
        rng: Callable[[], float] | None,
    ) -> None:
        self.now = now
        self.leases = leases
        self.dead_agents = dead_agents
        self.lease_s = lease_s
        self.rng = rng


def decide(
    state: PipelineState,
    now: datetime,
    *,
    leases: Mapping[str, datetime] | None = None,
    dead_agents: Collection[str] = (),
    lease_s: float = 30.0,
    rng: Callable[[], float] | None = None,
) -> list[Decision]:
    """Events to append (in order), then commands to send, then stages ready for placement.

    `leases` maps attempt ids to lease expiries renewed by heartbeats (kept by the service, not in the
    log); `dead_agents` are agents known lost; `lease_s` is how long a recorded report keeps an attempt
    alive; `rng` returns floats in [0, 1) for jitter (default: a hash of the attempt id, so replays agree).
    `now` must be timezone-aware.
    """
    ctx = _Ctx(now, leases or {}, frozenset(dead_agents), lease_s, rng)
    order = topological_order(needs_of(state.spec))
    events: list[DecisionEvent] = []
    commands: list[Decision] = []
    current = state
    # Each pass moves at least one stage forward, so the loop is bounded; the cap is a guard.
    for _ in range(4 * len(order) + 8):
        step_events, step_commands = _step(current, order, ctx)
        if not step_events:
            break
        for event in step_events:
            current = evolve(current, event)
        events.extend(step_events)
        commands.extend(step_commands)
    return [*events, *commands, *_intents(current, order, ctx)]


# ---- the rules -------------------------------------------------------------------------------------------


def lease_expiry(
    attempt: AttemptState, *, leases: Mapping[str, datetime] | None = None, lease_s: float = 30.0
) -> datetime | None:
    """When an active attempt is declared lost without news. Before the agent accepts it: the accept
    deadline of `stage.placed` (schedule-to-start). After: its last recorded report + `lease_s`. Either
    way a later heartbeat-renewed lease from `leases` wins. None: no lease is tracked."""
    candidates: list[datetime | None] = [attempt.lease_expires_at]
    if attempt.was_accepted and attempt.last_seen_at is not None:
        candidates = [attempt.last_seen_at + timedelta(seconds=lease_s)]
    if leases is not None:
        candidates.append(leases.get(attempt.id))
    known = [c for c in candidates if c is not None]
    return max(known) if known else None


def _timeout_at(state: PipelineState, stage: str, attempt: AttemptState) -> datetime | None:
    timeout = state.stage_spec(stage).timeout_s
    start = attempt.started_at or attempt.accepted_at
    if timeout is None or start is None:
        return None
    return start + timedelta(seconds=timeout)


def _free_requeue(stage: StageState) -> bool:
    """The current attempt was lost before any agent accepted it, and free re-queues remain."""
    current = stage.current
    if current is None or current.status != "lost" or current.was_accepted:
        return False
    unaccepted = sum(1 for a in stage.attempts[stage.budget_from :] if a.status == "lost" and not a.was_accepted)
    return unaccepted <= MAX_FREE_REQUEUES


def _used(stage: StageState) -> int:
    counted = stage.attempts[stage.budget_from :]
    unaccepted = sum(1 for a in counted if a.status == "lost" and not a.was_accepted)
    return len(counted) - min(unaccepted, MAX_FREE_REQUEUES)


def _retryable(state: PipelineState, name: str) -> bool:
    """A failed stage whose current attempt will be retried (the budget and classes allow it)."""
    stage = state.stages[name]
    current = stage.current
    if stage.status != "failed" or current is None or current.status not in ("failed", "lost"):
        return False
    if _free_requeue(stage):
        return True
    policy = state.stage_spec(name).retry
    return (current.failure_class or "unknown") in policy.retry_on and _used(stage) < policy.max_attempts


def _backoff_s(state: PipelineState, name: str, ctx: _Ctx) -> float:
    stage = state.stages[name]
    if _free_requeue(stage):
        return 0.0
    policy = state.stage_spec(name).retry
    failures = max(1, _used(stage))
    if policy.backoff == "fixed":
        delay = policy.initial_delay_s
    else:
        delay = policy.initial_delay_s * 2.0 ** min(failures - 1, 60)
    delay = min(delay, policy.max_delay_s)
    if policy.jitter == "full":
        delay *= _unit(ctx, stage.current.id if stage.current is not None else name)
    return delay


def _unit(ctx: _Ctx, key: str) -> float:
    if ctx.rng is not None:
        return min(max(ctx.rng(), 0.0), 1.0)
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _failed_for_good(state: PipelineState, name: str) -> bool:
    return state.stages[name].status == "failed" and not _retryable(state, name)


def _finished(state: PipelineState, name: str) -> bool:
    status = state.stages[name].status
    return status in ("succeeded", "skipped", "cancelled") or (status == "failed" and not _retryable(state, name))


Verdict = tuple[Literal["ready", "wait", "skip"], str]


def _verdict(state: PipelineState, name: str, in_flight: Collection[str] | None) -> Verdict:
    """Whether a pending stage may run, must wait, or is skipped (with the reason)."""
    spec = state.stage_spec(name)
    if spec.when == "on_success":
        for dep in spec.needs:
            status = state.stages[dep].status
            if _failed_for_good(state, dep):
                return "skip", f"dependency {dep!r} failed"
            if status == "skipped":
                return "skip", f"dependency {dep!r} was skipped"
            if status == "cancelled":
                return "skip", f"dependency {dep!r} was cancelled"
        waiting = [d for d in spec.needs if state.stages[d].status != "succeeded"]
        return ("wait", f"waiting for {', '.join(waiting)}") if waiting else ("ready", "")
    waiting = [d for d in spec.needs if not _finished(state, d)]
    if waiting:
        return "wait", f"waiting for {', '.join(waiting)} to finish"
    if spec.when == "always":
        return "ready", ""
    if any(_failed_for_good(state, n) for n in state.stages):
        return "ready", ""
    others = [n for n in (in_flight or ()) if n != name]
    if others:
        return "wait", f"runs only if a stage fails; waiting for {', '.join(others)}"
    return "skip", "no stage failed (when: on_failure)"


def _in_flight(state: PipelineState, order: list[str]) -> list[str]:
    """Stages that may still run (and so still fail): running, awaiting a retry, or ready to place."""
    out: list[str] = []
    for name in order:
        stage = state.stages[name]
        running = stage.active_attempt is not None or _retryable(state, name)
        ready = (
            stage.status == "pending"
            and state.stage_spec(name).when != "on_failure"
            and _verdict(state, name, None)[0] == "ready"
        )
        if running or ready:
            out.append(name)
    return out


def _step(state: PipelineState, order: list[str], ctx: _Ctx) -> tuple[list[DecisionEvent], list[Decision]]:
    if state.terminal:
        return [], []
    pid = state.pipeline_id
    events: list[DecisionEvent] = []
    commands: list[Decision] = []

    # 1. Liveness and run time of active attempts.
    for name in order:
        attempt = state.stages[name].active_attempt
        if attempt is None:
            continue
        if attempt.agent in ctx.dead_agents:
            events.append(
                AttemptLost(
                    pipeline_id=pid,
                    stage=name,
                    attempt=attempt.id,
                    agent=attempt.agent,
                    reason=f"agent {attempt.agent} was lost",
                )
            )
            continue
        expiry = lease_expiry(attempt, leases=ctx.leases, lease_s=ctx.lease_s)
        if expiry is not None and ctx.now >= expiry:
            if attempt.was_accepted:
                seen = attempt.last_seen_at or attempt.accepted_at
                since = f" since {seen.isoformat()}" if seen is not None else ""
                reason = f"no heartbeat from agent {attempt.agent}{since}; lease expired at {expiry.isoformat()}"
            else:
                reason = f"agent {attempt.agent} did not accept the attempt by {expiry.isoformat()}"
            events.append(
                AttemptLost(pipeline_id=pid, stage=name, attempt=attempt.id, agent=attempt.agent, reason=reason)
            )
            commands.append(SendCommand(command=cancel_command(state, name, attempt, now=ctx.now, reason=reason)))
            continue
        deadline = _timeout_at(state, name, attempt)
        if deadline is not None and ctx.now >= deadline:
            timeout = state.stage_spec(name).timeout_s or 0.0
            reason = f"ran longer than the stage timeout of {_seconds(timeout)}"
            events.append(
                StageFailed(pipeline_id=pid, stage=name, attempt=attempt.id, failure_class="timeout", reason=reason)
            )
            commands.append(SendCommand(command=cancel_command(state, name, attempt, now=ctx.now, reason=reason)))
    if events:
        return events, commands

    # 2. Failed stages: retry (or, when cancelling, stop); a stage that will not retry stays failed.
    for name in order:
        stage = state.stages[name]
        current = stage.current
        if stage.status != "failed" or current is None or not _retryable(state, name):
            continue
        if state.cancel_requested:
            events.append(StageCancelled(pipeline_id=pid, stage=name, reason=_cancel_reason(state)))
            continue
        delay = _backoff_s(state, name, ctx)
        events.append(
            StageRetryScheduled(
                pipeline_id=pid,
                stage=name,
                attempt=current.id,
                next_attempt_number=len(stage.attempts) + 1,
                not_before=ctx.now + timedelta(seconds=delay),
            )
        )

    # 3. Pending stages: cancel, or skip when their `when` can no longer hold.
    in_flight: list[str] | None = None
    for name in order:
        stage = state.stages[name]
        if stage.status != "pending":
            continue
        if state.cancel_requested:
            events.append(StageCancelled(pipeline_id=pid, stage=name, reason=_cancel_reason(state)))
            continue
        if state.stage_spec(name).when == "on_failure" and in_flight is None:
            in_flight = _in_flight(state, order)
        kind, reason = _verdict(state, name, in_flight)
        if kind == "skip":
            events.append(StageSkipped(pipeline_id=pid, stage=name, reason=reason))
    if events:
        return events, commands

    # 4. The end: every stage final.
    if all(_finished(state, name) for name in order):
        failed = [n for n in order if state.stages[n].status == "failed"]
        cancelled = [n for n in order if state.stages[n].status == "cancelled"]
        if state.cancel_requested:
            events.append(PipelineCancelled(pipeline_id=pid, reason=_cancel_reason(state)))
        elif failed:
            events.append(
                PipelineFailed(pipeline_id=pid, reason=_failure_summary(state, failed), failed_stages=tuple(failed))
            )
        elif cancelled:
            events.append(PipelineCancelled(pipeline_id=pid, reason=f"cancelled: {', '.join(cancelled)}"))
        else:
            events.append(PipelineSucceeded(pipeline_id=pid))
    return events, commands


def _intents(state: PipelineState, order: list[str], ctx: _Ctx) -> list[Decision]:
    if state.terminal:
        return []
    out: list[Decision] = []
    positions = {name: i for i, name in enumerate(state.spec.stages)}
    for name in order:
        stage = state.stages[name]
        attempt = stage.active_attempt
        if attempt is not None:
            if state.cancel_requested:
                command = cancel_command(state, name, attempt, now=ctx.now, reason=_cancel_reason(state))
                out.append(SendCommand(command=command))
            elif attempt.status == "placed":
                out.append(SendCommand(command=run_command(state, name, attempt, now=ctx.now, lease_s=ctx.lease_s)))
            continue
        if stage.status != "pending" or state.cancel_requested:
            continue
        if stage.not_before is not None and ctx.now < stage.not_before:
            continue
        if _verdict(state, name, ())[0] != "ready":
            continue
        spec = state.stage_spec(name)
        out.append(
            ReadyStage(
                pipeline_id=state.pipeline_id,
                stage=name,
                kind=spec.kind,
                attempt_number=len(stage.attempts) + 1,
                resources=spec.resources,
                pipeline_priority=state.spec.priority,
                priority=spec.priority,
                queued_at=state.submitted_position or 0,
                index=positions[name],
            )
        )
    return out


def _cancel_reason(state: PipelineState) -> str:
    return f"pipeline cancelled: {state.cancel_reason}" if state.cancel_reason else "pipeline cancelled"


def _seconds(value: float) -> str:
    total = int(value)
    if total != value or total < 60:
        return f"{value:g}s"
    parts: list[str] = []
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)):
        if total >= size:
            parts.append(f"{total // size}{unit}")
            total %= size
    return "".join(parts)


def _failure_summary(state: PipelineState, failed: list[str]) -> str:
    parts: list[str] = []
    for name in failed:
        stage = state.stages[name]
        current = stage.current
        cls = (current.failure_class if current is not None else None) or "unknown"
        detail = stage.reason if stage.reason and stage.reason != cls else ""
        tries = len(stage.attempts) - stage.budget_from
        parts.append(f"{name} ({cls}{': ' + detail if detail else ''}; {_plural(tries, 'attempt')})")
    head = "stage" if len(failed) == 1 else "stages"
    return f"{head} failed: {'; '.join(parts)}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ---- helpers for the service and the API -------------------------------------------------------------------


def run_command(state: PipelineState, stage: str, attempt: AttemptState, *, now: datetime, lease_s: float) -> RunStage:
    """The command that starts `attempt`; its id is the attempt id, so re-sending it is idempotent."""
    spec = state.stage_spec(stage)
    upstream = ancestors(needs_of(state.spec), [stage])
    inputs = {name: dict(s.outputs) for name, s in state.stages.items() if name in upstream and s.status == "succeeded"}
    return RunStage(
        command_id=attempt.id,
        agent=attempt.agent,
        issued_at=now,
        pipeline_id=state.pipeline_id,
        pipeline_name=state.name,
        stage=stage,
        attempt=attempt.id,
        attempt_number=attempt.number,
        spec=spec,
        gpus=attempt.gpus,
        inputs=inputs,
        resume_from_path=attempt.resume_from_path,
        lease_s=lease_s,
    )


def cancel_command(
    state: PipelineState, stage: str, attempt: AttemptState, *, now: datetime, reason: str
) -> CancelAttempt:
    return CancelAttempt(
        command_id=f"cancel-{attempt.id}",
        agent=attempt.agent,
        issued_at=now,
        pipeline_id=state.pipeline_id,
        stage=stage,
        attempt=attempt.id,
        reason=reason,
    )


def placed_event(
    state: PipelineState,
    placement: Placement,
    *,
    attempt_id: str,
    now: datetime,
    accept_timeout_s: float,
) -> StagePlaced:
    """The `stage.placed` event for a placement: a new attempt, resuming from the stage's latest checkpoint."""
    stage = state.stages[placement.stage]
    return StagePlaced(
        pipeline_id=state.pipeline_id,
        stage=placement.stage,
        attempt=attempt_id,
        attempt_number=len(stage.attempts) + 1,
        agent=placement.agent,
        gpus=placement.gpus,
        cpu_slots=placement.cpu_slots,
        lease_expires_at=now + timedelta(seconds=accept_timeout_s),
        resume_from_step=stage.checkpoint_step,
        resume_from_path=stage.checkpoint_path,
        placement=placement.why,
    )


def pending_event(state: PipelineState, unplaceable: Unplaceable) -> StagePending | None:
    """`stage.pending` with the placement reason, only when the recorded reason changes."""
    stage = state.stages.get(unplaceable.stage)
    if stage is None or stage.status != "pending" or stage.pending_reason == unplaceable.reason:
        return None
    return StagePending(pipeline_id=state.pipeline_id, stage=unplaceable.stage, reason=unplaceable.reason)


def describe_pending(state: PipelineState, stage: str, now: datetime) -> str | None:
    """Why a pending stage is not running yet (for `pending_reason` in the API); None when not pending."""
    current = state.stages.get(stage)
    if current is None or current.status != "pending" or state.terminal:
        return None
    if state.cancel_requested:
        return "pipeline is being cancelled"
    kind, reason = _verdict(state, stage, _in_flight(state, topological_order(needs_of(state.spec))))
    if kind != "ready":
        return reason
    if current.not_before is not None and now < current.not_before:
        previous = current.attempts[-1] if current.attempts else None
        cls = previous.failure_class if previous is not None else None
        after = f" after a {cls} failure" if cls else ""
        return f"retrying{after}; not before {current.not_before.isoformat()}"
    return current.pending_reason or "waiting for placement"


def next_deadline(
    state: PipelineState, *, leases: Mapping[str, datetime] | None = None, lease_s: float = 30.0
) -> datetime | None:
    """The earliest time at which `decide` would act without a new event (backoff end, lease, timeout)."""
    if state.terminal:
        return None
    times: list[datetime] = []
    for name, stage in state.stages.items():
        if stage.status == "pending" and stage.not_before is not None:
            times.append(stage.not_before)
        attempt = stage.active_attempt
        if attempt is not None:
            expiry = lease_expiry(attempt, leases=leases, lease_s=lease_s)
            if expiry is not None:
                times.append(expiry)
            timeout = _timeout_at(state, name, attempt)
            if timeout is not None:
                times.append(timeout)
    return min(times) if times else None


def retry_request(state: PipelineState) -> PipelineRetryRequested | None:
    """`pipeline.retry_requested` for a failed or cancelled pipeline (None: nothing to retry, HTTP 409)."""
    if state.status not in ("failed", "cancelled"):
        return None
    stages = tuple(n for n, s in state.stages.items() if s.status in ("failed", "cancelled", "skipped"))
    if not stages:
        return None
    return PipelineRetryRequested(pipeline_id=state.pipeline_id, stages=stages)


def cancel_request(state: PipelineState, reason: str = "cancelled by user") -> PipelineCancelRequested | None:
    """`pipeline.cancel_requested` unless the pipeline ended or a cancel is already under way."""
    if state.terminal or state.cancel_requested:
        return None
    return PipelineCancelRequested(pipeline_id=state.pipeline_id, reason=reason)
