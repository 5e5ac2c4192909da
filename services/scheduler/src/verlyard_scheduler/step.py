"""Pure core: one turn of the scheduler loop, planned: admit reports, decide changed pipelines, place
ready stages; the result is what to append (per stream, with the expected version) and what to send
after each append commits. Time and ids are parameters; the world is read, never changed, except the
in-memory liveness a heartbeat renews (`leases`, `last_seen`), which is not part of the log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import assert_never

import msgspec

from verlyard_scheduler.decide import (
    ReadyStage,
    SendCommand,
    cancel_command,
    decide,
    pending_event,
    placed_event,
    run_command,
)
from verlyard_scheduler.fold import AgentState, PipelineState, evolve, evolve_agent
from verlyard_scheduler.ingest import AnyAttemptReport, admit_heartbeat, admit_hello, admit_report
from verlyard_scheduler.placement import Placement, place
from verlyard_scheduler.world import AGENT_PREFIX, PIPELINE_PREFIX, World
from verlyard_shared.commands import AnyCommand, CancelAttempt, DrainAgent
from verlyard_shared.envelope import Envelope, NewEvent
from verlyard_shared.events import AgentLost, AgentRegistered, AnyEvent
from verlyard_shared.reports import (
    AgentHeartbeat,
    AgentHello,
    AnyReport,
    AttemptAcceptedReport,
    AttemptFinishedReport,
    AttemptProgressReport,
    AttemptStartedReport,
    CheckpointReport,
)


class StepConfig(msgspec.Struct, frozen=True, kw_only=True):
    lease_s: float = 30.0
    """How long a report or heartbeat keeps an attempt alive (RunStage.lease_s)."""
    accept_timeout_s: float = 30.0
    """Schedule-to-start: an attempt no agent accepted by then is lost (and re-queued for free)."""
    agent_timeout_s: float = 30.0
    """No hello or heartbeat from an agent for this long: `agent.lost`."""


class StreamAppend(msgspec.Struct, kw_only=True):
    """The events one stream gets in this turn, and what follows once they commit."""

    stream_id: str
    expected_version: int
    events: list[NewEvent] = []
    commands: list[AnyCommand] = []
    """Sent only after the append commits (publish after commit)."""
    tokens: list[int] = []
    """Report messages settled by this append: acked after it commits, nak'ed if it fails."""
    causation_id: str | None = None
    """The first report behind the events, recorded as their causation."""
    pipeline: PipelineState | None = None
    """A pipeline stream's state once these events commit (folded with their versions and `now`)."""
    agent: AgentState | None = None
    """An agent stream's state once these events commit (None: not registered)."""

    @property
    def version(self) -> int:
        """The stream's version once these events commit."""
        return self.expected_version + len(self.events)


class Plan(msgspec.Struct, kw_only=True):
    appends: dict[str, StreamAppend] = {}
    commands: list[AnyCommand] = []
    """Sent at once (nothing to append first): heartbeat fencing, drain re-sends."""
    acks: list[int] = []
    """Report messages settled without an append (heartbeats, duplicates)."""
    dropped: list[tuple[int, str]] = []
    """Report messages refused outright, with why (an unknown pipeline): terminated, logged."""
    ready: dict[str, tuple[ReadyStage, ...]] = {}
    """Pipeline -> its ready stages as of this turn's decisions (placed ones included; filtered on commit)."""
    hellos: list[str] = []
    """Agents that said hello (the service makes sure their command consumer exists)."""
    failed: list[tuple[str, str]] = []
    """(pipeline, error) whose decision raised: isolated and logged, decided again on its next change."""
    placed: int = 0


class _Turn:
    """Working state of one planning pass: tentative pipeline/agent states on top of the world."""

    def __init__(self, world: World, now: datetime, config: StepConfig, new_id: Callable[[], str]) -> None:
        self.world = world
        self.now = now
        self.config = config
        self.new_id = new_id
        self.plan = Plan()
        self.pipelines: dict[str, PipelineState] = {}
        self.agents: dict[str, AgentState | None] = {}

    def pipeline(self, pid: str) -> PipelineState | None:
        found = self.pipelines.get(pid)
        return found if found is not None else self.world.pipelines.get(pid)

    def agent(self, agent: str) -> AgentState | None:
        if agent in self.agents:
            return self.agents[agent]
        return self.world.agents.get(agent)

    def _append(self, stream_id: str, expected: int) -> StreamAppend:
        found = self.plan.appends.get(stream_id)
        if found is None:
            found = StreamAppend(stream_id=stream_id, expected_version=expected)
            self.plan.appends[stream_id] = found
        return found

    def _envelope(self, out: StreamAppend, new: NewEvent) -> Envelope:
        # Folded with the version it will get and `now` as its time, so the tentative state is the
        # state the world holds once the append commits (the recorded time differs by milliseconds).
        return Envelope(
            position=self.world.position,
            event_id=new.event_id,
            stream_id=out.stream_id,
            version=out.version,
            recorded_at=self.now,
            actor="scheduler",
            correlation_id=out.stream_id,
            event=new.event,
        )

    def pipeline_events(
        self, pid: str, events: Sequence[AnyEvent], *, token: int | None = None, cause: str | None = None
    ) -> StreamAppend:
        committed = self.world.pipelines[pid]
        out = self._append(PIPELINE_PREFIX + pid, committed.version)
        state = self.pipeline(pid)
        assert state is not None
        for event in events:
            new = NewEvent(event_id=self.new_id(), event=event)
            out.events.append(new)
            state = evolve(state, self._envelope(out, new))
        self.pipelines[pid] = state
        out.pipeline = state
        if token is not None:
            out.tokens.append(token)
        if out.causation_id is None:
            out.causation_id = cause
        return out

    def agent_event(self, agent: str, event: AnyEvent, *, token: int | None = None) -> None:
        out = self._append(AGENT_PREFIX + agent, self.world.agent_versions.get(agent, 0))
        new = NewEvent(event_id=self.new_id(), event=event)
        out.events.append(new)
        state = evolve_agent(self.agent(agent), self._envelope(out, new))
        self.agents[agent] = state
        out.agent = state
        if token is not None:
            out.tokens.append(token)


def plan_step(
    world: World,
    now: datetime,
    *,
    reports: Sequence[tuple[int, AnyReport]] = (),
    dirty: Iterable[str] = (),
    place_all: bool = False,
    config: StepConfig = StepConfig(),
    new_id: Callable[[], str],
) -> Plan:
    """Plan one turn. `reports` are (message token, decoded report) in delivery order; `dirty` are the
    pipelines whose state changed (or whose deadline passed) since they were last decided."""
    turn = _Turn(world, now, config, new_id)
    touched: dict[str, None] = dict.fromkeys(p for p in dirty if p in world.pipelines)
    for token, report in reports:
        pid = _ingest(turn, token, report)
        if pid is not None:
            touched[pid] = None
    _liveness(turn)
    for pid in touched:
        _decide(turn, pid)
    if place_all or turn.plan.ready:
        _place(turn)
    return turn.plan


# ---- reports ----------------------------------------------------------------------------------------------


def _ingest(turn: _Turn, token: int, report: AnyReport) -> str | None:
    """Admit one report; returns the pipeline it concerns (to be decided), if any."""
    match report:
        case AgentHello():
            _hello(turn, token, report)
            return None
        case AgentHeartbeat():
            _heartbeat(turn, token, report)
            return None
        case (
            AttemptAcceptedReport()
            | AttemptStartedReport()
            | AttemptProgressReport()
            | CheckpointReport()
            | AttemptFinishedReport()
        ):
            return _attempt_report(turn, token, report)
        case _:
            assert_never(report)


def _hello(turn: _Turn, token: int, hello: AgentHello) -> None:
    turn.world.last_seen[hello.agent] = turn.now
    turn.plan.hellos.append(hello.agent)
    event = admit_hello(turn.agent(hello.agent), hello)
    if event is None:
        turn.plan.acks.append(token)
    else:
        turn.agent_event(hello.agent, event, token=token)


def _heartbeat(turn: _Turn, token: int, heartbeat: AgentHeartbeat) -> None:
    world = turn.world
    agent = turn.agent(heartbeat.agent)
    if agent is None:
        turn.plan.acks.append(token)  # never said hello: nothing to renew (its hello is on its way)
        return
    world.last_seen[heartbeat.agent] = turn.now
    world.reported_draining[heartbeat.agent] = heartbeat.draining
    lookup: dict[str, tuple[PipelineState, str]] = {}
    for aid in heartbeat.running_attempts:
        found = world.attempts.get(aid)
        if found is not None:
            state = world.pipelines.get(found[0])
            if state is not None:
                lookup[aid] = (state, found[1])
        elif aid in world.retired_attempts:
            pid, stage = world.retired_attempts[aid]
            turn.plan.commands.append(
                CancelAttempt(
                    command_id=f"cancel-{aid}",
                    agent=heartbeat.agent,
                    issued_at=turn.now,
                    pipeline_id=pid,
                    stage=stage,
                    attempt=aid,
                    reason="the attempt's pipeline has ended; stop it",
                )
            )
    renewals, cancels = admit_heartbeat(heartbeat, lookup, now=turn.now, lease_s=turn.config.lease_s)
    world.leases.update(renewals)
    turn.plan.commands.extend(cancels)
    if agent.status == "draining" and not heartbeat.draining:
        turn.plan.commands.append(drain_command(agent, turn.world.agent_versions.get(agent.agent, 0), turn.now))
    if agent.status == "lost":
        # Back from a partition or a pause: it takes work again, with the inventory it registered.
        revived = AgentRegistered(
            agent=agent.agent,
            hostname=agent.hostname,
            gpus=agent.gpus,
            cpu_slots=agent.cpu_slots,
            labels=agent.labels,
            version=agent.version,
        )
        turn.agent_event(agent.agent, revived, token=token)
    else:
        turn.plan.acks.append(token)


def drain_command(agent: AgentState, stream_version: int, now: datetime) -> DrainAgent:
    """The drain command of the agent's current drain request (one id per request: re-sends dedupe)."""
    return DrainAgent(
        command_id=f"drain-{agent.agent}-{stream_version}", agent=agent.agent, issued_at=now, reason=agent.reason
    )


def _attempt_report(turn: _Turn, token: int, report: AnyAttemptReport) -> str | None:
    pid = report.pipeline_id
    state = turn.pipeline(pid)
    if state is None:
        turn.plan.dropped.append((token, f"unknown pipeline {pid}"))
        return None
    events = admit_report(state, report)
    if not events:
        turn.plan.acks.append(token)  # a duplicate the state already reflects
        return pid
    turn.pipeline_events(pid, events, token=token, cause=report.report_id)
    return pid


# ---- liveness, decisions, placement -----------------------------------------------------------------------


def _liveness(turn: _Turn) -> None:
    timeout = timedelta(seconds=turn.config.agent_timeout_s)
    for name, agent in turn.world.agents.items():
        if agent.status not in ("active", "draining") or name in turn.agents:
            continue
        seen = turn.world.last_seen.get(name)
        if seen is not None and turn.now >= seen + timeout:
            reason = f"no heartbeat since {seen.isoformat()} (timeout {turn.config.agent_timeout_s:g}s)"
            turn.agent_event(name, AgentLost(agent=name, reason=reason))


def _decide(turn: _Turn, pid: str) -> None:
    state = turn.pipeline(pid)
    if state is None or state.terminal:
        return
    try:
        decisions = decide(
            state,
            turn.now,
            leases=turn.world.leases,
            dead_agents=turn.world.dead_agents,
            lease_s=turn.config.lease_s,
        )
    except Exception as exc:  # one broken pipeline must not stop the others
        turn.plan.failed.append((pid, f"{type(exc).__name__}: {exc}"))
        return
    events: list[AnyEvent] = []
    commands: list[AnyCommand] = []
    ready: list[ReadyStage] = []
    for decision in decisions:
        if isinstance(decision, SendCommand):
            commands.append(decision.command)
        elif isinstance(decision, ReadyStage):
            ready.append(decision)
        else:
            events.append(decision)
    if events:
        out = turn.pipeline_events(pid, events)
        out.commands.extend(commands)
    else:
        turn.plan.commands.extend(commands)
    turn.plan.ready[pid] = tuple(ready)


def still_ready(state: PipelineState | None, item: ReadyStage) -> bool:
    """The stage is still waiting for placement (not placed, cancelled or ended meanwhile)."""
    if state is None or state.terminal or state.cancel_requested:
        return False
    stage = state.stages.get(item.stage)
    return stage is not None and stage.status == "pending" and stage.active_attempt is None


def _place(turn: _Turn) -> None:
    world = turn.world
    candidates: list[ReadyStage] = []
    sources: Mapping[str, tuple[ReadyStage, ...]] = {**world.ready, **turn.plan.ready}
    for pid, items in sources.items():
        state = turn.pipeline(pid)
        candidates.extend(item for item in items if still_ready(state, item))
    if not candidates:
        return
    views = world.views(turn.pipelines, heartbeat_timeout_s=turn.config.agent_timeout_s)
    for result in place(candidates, views, turn.now):
        pid = result.pipeline_id
        state = turn.pipeline(pid)
        assert state is not None
        if isinstance(result, Placement):
            event = placed_event(
                state, result, attempt_id=turn.new_id(), now=turn.now, accept_timeout_s=turn.config.accept_timeout_s
            )
            out = turn.pipeline_events(pid, [event])
            placed_state = turn.pipelines[pid]
            attempt = placed_state.stages[result.stage].current
            assert attempt is not None and attempt.id == event.attempt
            out.commands.append(
                run_command(placed_state, result.stage, attempt, now=turn.now, lease_s=turn.config.lease_s)
            )
            turn.plan.placed += 1
        else:
            pending = pending_event(state, result)
            if pending is not None:
                turn.pipeline_events(pid, [pending])


# ---- reconciliation ---------------------------------------------------------------------------------------


def outstanding(world: World, now: datetime, *, lease_s: float) -> list[AnyCommand]:
    """Every command the log says is still owed (level-triggered): RunStage for each placed attempt no
    agent has accepted, CancelAttempt for each active attempt of a pipeline being cancelled, DrainAgent
    for each draining agent whose heartbeats do not say it drains. Re-sending dedupes on the bus."""
    commands: list[AnyCommand] = []
    for pid, state in world.pipelines.items():
        if state.terminal or not world.holdings(pid):
            continue
        for name, stage in state.stages.items():
            attempt = stage.active_attempt
            if attempt is None:
                continue
            if state.cancel_requested:
                commands.append(cancel_command(state, name, attempt, now=now, reason=_cancel_reason(state)))
            elif attempt.status == "placed":
                commands.append(run_command(state, name, attempt, now=now, lease_s=lease_s))
    for name, agent in world.agents.items():
        if agent.status == "draining" and not world.reported_draining.get(name, False):
            commands.append(drain_command(agent, world.agent_versions.get(name, 0), now))
    return commands


def _cancel_reason(state: PipelineState) -> str:
    return f"pipeline cancelled: {state.cancel_reason}" if state.cancel_reason else "pipeline cancelled"
