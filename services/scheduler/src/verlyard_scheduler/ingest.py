"""Pure core: admit agent reports as events, fencing stale attempts (a rejected report is audited).

A report is checked against the pipeline's folded state: the stage must exist, the attempt must be
the stage's current one and belong to the reporting agent. A report of an attempt the scheduler has
given up on (lost, timed out) or replaced is rejected with `report.rejected`; a redelivered report
that the state already reflects is dropped silently (empty list), so duplicates change nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import assert_never

from verlyard_scheduler.fold import AgentState, AttemptState, PipelineState
from verlyard_shared.commands import CancelAttempt
from verlyard_shared.events import (
    AgentRegistered,
    AnyEvent,
    AttemptAccepted,
    AttemptProgressed,
    AttemptStarted,
    CheckpointSaved,
    ReportRejected,
    StageCancelled,
    StageFailed,
    StageSucceeded,
)
from verlyard_shared.reports import (
    AgentHeartbeat,
    AgentHello,
    AttemptAcceptedReport,
    AttemptFinishedReport,
    AttemptProgressReport,
    AttemptStartedReport,
    CheckpointReport,
)
from verlyard_shared.validation import FAILURE_CLASSES

AnyAttemptReport = (
    AttemptAcceptedReport | AttemptStartedReport | AttemptProgressReport | CheckpointReport | AttemptFinishedReport
)


def _tag(report: AnyAttemptReport) -> str:
    tag = type(report).__struct_config__.tag
    return tag if isinstance(tag, str) else type(report).__name__


def _reject(report: AnyAttemptReport, reason: str) -> list[AnyEvent]:
    return [
        ReportRejected(
            pipeline_id=report.pipeline_id,
            stage=report.stage,
            attempt=report.attempt,
            agent=report.agent,
            report_type=_tag(report),
            reason=reason,
        )
    ]


def _fenced(attempt: AttemptState) -> bool:
    """The scheduler ended this attempt itself (lease or timeout): everything it says now is stale."""
    return attempt.status == "lost" or (attempt.status == "failed" and attempt.failure_class == "timeout")


def admit_report(state: PipelineState | None, report: AnyAttemptReport) -> list[AnyEvent]:
    """The events one attempt report adds to the pipeline's stream (possibly none, or a rejection)."""
    if state is None:
        return _reject(report, f"unknown pipeline {report.pipeline_id}")
    stage = state.stages.get(report.stage)
    if stage is None:
        return _reject(report, f"unknown stage {report.stage!r}")
    attempt = stage.attempt(report.attempt)
    if attempt is None:
        return _reject(report, f"unknown attempt {report.attempt} of stage {report.stage!r}")
    if attempt.agent != report.agent:
        return _reject(report, f"attempt {attempt.id} was placed on agent {attempt.agent}, not {report.agent}")
    current = stage.current
    if current is not None and current.id != attempt.id:
        return _reject(report, f"stale attempt {attempt.number}: the stage is on attempt {current.number}")
    if _fenced(attempt):
        return _reject(report, f"attempt {attempt.number} was declared {attempt.status}: {attempt.reason}")
    pid, name, aid = state.pipeline_id, report.stage, attempt.id
    match report:
        case AttemptAcceptedReport():
            if attempt.status != "placed":
                return []
            return [AttemptAccepted(pipeline_id=pid, stage=name, attempt=aid, agent=report.agent)]
        case AttemptStartedReport():
            if attempt.status not in ("placed", "accepted"):
                return []
            return [AttemptStarted(pipeline_id=pid, stage=name, attempt=aid, agent=report.agent, pid=report.pid)]
        case AttemptProgressReport():
            if not attempt.active or (attempt.step is not None and report.step <= attempt.step):
                return []
            return [
                AttemptProgressed(
                    pipeline_id=pid, stage=name, attempt=aid, step=report.step, total_steps=report.total_steps
                )
            ]
        case CheckpointReport():
            # Kept even when it arrives after the attempt finished: a retry resumes from it.
            if stage.checkpoint_step is not None and report.step <= stage.checkpoint_step:
                return []
            return [
                CheckpointSaved(
                    pipeline_id=pid,
                    stage=name,
                    attempt=aid,
                    step=report.step,
                    path=report.path,
                    size_bytes=report.size_bytes,
                )
            ]
        case AttemptFinishedReport():
            return _finished(state, attempt, report)
        case _:
            assert_never(report)


def _finished(state: PipelineState, attempt: AttemptState, report: AttemptFinishedReport) -> list[AnyEvent]:
    pid, name, aid = state.pipeline_id, report.stage, attempt.id
    if not attempt.active:
        same = {"succeeded": "succeeded", "failed": "failed", "cancelled": "cancelled"}.get(report.outcome)
        if same == attempt.status or (report.outcome == "cancelled" and attempt.status == "failed"):
            return []  # the same end, delivered again
        return _reject(report, f"attempt {attempt.number} already ended: {attempt.status}")
    if report.outcome == "succeeded":
        return [
            StageSucceeded(pipeline_id=pid, stage=name, attempt=aid, outputs=report.outputs, exit_code=report.exit_code)
        ]
    if report.outcome == "failed":
        cls = report.failure_class if report.failure_class in FAILURE_CLASSES else "unknown"
        reason = report.reason or (f"exit code {report.exit_code}" if report.exit_code is not None else cls)
        return [
            StageFailed(
                pipeline_id=pid, stage=name, attempt=aid, failure_class=cls, reason=reason, exit_code=report.exit_code
            )
        ]
    if report.outcome == "cancelled":
        if state.cancel_requested:
            return [StageCancelled(pipeline_id=pid, stage=name, attempt=aid, reason=report.reason or "cancelled")]
        # Stopped without being asked (the agent shut down, the host is being drained): run it elsewhere.
        why = "the agent stopped the attempt without a cancel request"
        return [
            StageFailed(
                pipeline_id=pid,
                stage=name,
                attempt=aid,
                failure_class="preempted",
                reason=f"{why}: {report.reason}" if report.reason else why,
                exit_code=report.exit_code,
            )
        ]
    return _reject(report, f"unknown outcome {report.outcome!r} (expected succeeded, failed or cancelled)")


def admit_hello(agent: AgentState | None, hello: AgentHello) -> AgentRegistered | None:
    """`agent.registered` when an agent is new, back from lost/gone, or its inventory changed."""
    event = AgentRegistered(
        agent=hello.agent,
        hostname=hello.hostname,
        gpus=hello.gpus,
        cpu_slots=hello.cpu_slots,
        labels=hello.labels,
        version=hello.version,
    )
    if agent is None or agent.status in ("lost", "gone"):
        return event
    same = (agent.hostname, agent.gpus, agent.cpu_slots, agent.labels, agent.version) == (
        hello.hostname,
        hello.gpus,
        hello.cpu_slots,
        hello.labels,
        hello.version,
    )
    return None if same else event


def attempts_by_id(states: Iterable[PipelineState]) -> dict[str, tuple[PipelineState, str]]:
    """Every known attempt id -> (its pipeline's state, its stage): routes heartbeats."""
    index: dict[str, tuple[PipelineState, str]] = {}
    for state in states:
        for name, stage in state.stages.items():
            for attempt in stage.attempts:
                index[attempt.id] = (state, name)
    return index


def admit_heartbeat(
    heartbeat: AgentHeartbeat,
    attempts: Mapping[str, tuple[PipelineState, str]],
    *,
    now: datetime,
    lease_s: float,
) -> tuple[dict[str, datetime], list[CancelAttempt]]:
    """Lease renewals for the attempts the agent runs that are still current, and a cancel for each
    that is not (a zombie of a lost or replaced attempt: fencing). Unknown ids are ignored."""
    renewals: dict[str, datetime] = {}
    cancels: list[CancelAttempt] = []
    for attempt_id in heartbeat.running_attempts:
        found = attempts.get(attempt_id)
        if found is None:
            continue
        state, name = found
        stage = state.stages[name]
        attempt = stage.attempt(attempt_id)
        if attempt is None:
            continue
        if attempt.active and attempt.agent == heartbeat.agent:
            renewals[attempt_id] = now + timedelta(seconds=lease_s)
        else:
            cancels.append(
                CancelAttempt(
                    command_id=f"cancel-{attempt_id}",
                    agent=heartbeat.agent,
                    issued_at=now,
                    pipeline_id=state.pipeline_id,
                    stage=name,
                    attempt=attempt_id,
                    reason=f"attempt is {attempt.status}; stop it",
                )
            )
    return renewals, cancels
