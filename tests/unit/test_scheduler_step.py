"""Unit: the scheduler service's pure parts: the in-memory world and one planned turn (fixed clock, no I/O).

Given a world folded from envelopes, when reports arrive or time passes, then the plan holds the
events per stream (with expected versions), the commands that wait for the commit, and the settling
of every report message.
"""

from __future__ import annotations

import itertools
from datetime import timedelta

from msgspec.structs import replace

from verlyard_scheduler.adapters.pg_log import live
from verlyard_scheduler.fold import PipelineState
from verlyard_scheduler.step import Plan, StepConfig, outstanding, plan_step
from verlyard_scheduler.world import Change, World
from verlyard_shared.commands import CancelAttempt, DrainAgent, RunStage
from verlyard_shared.envelope import Envelope
from verlyard_shared.events import (
    AgentDrainRequested,
    AgentLost,
    AgentRegistered,
    AnyEvent,
    AttemptAccepted,
    AttemptStarted,
    PipelineCancelRequested,
    PipelineRetryRequested,
    PipelineSubmitted,
    StagePending,
    StagePlaced,
    StageSucceeded,
)
from verlyard_shared.reports import (
    AgentHeartbeat,
    AgentHello,
    AttemptAcceptedReport,
    AttemptFinishedReport,
    AttemptStartedReport,
)

from .pipeline_world import T0, spec

CONFIG = StepConfig(lease_s=10.0, accept_timeout_s=10.0, agent_timeout_s=10.0)
CHAIN = spec({"a": {}, "b": {"needs": ["a"]}})


class Log:
    """Appends envelopes to a world as the tail would (positions and versions counted here)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.position = 0
        self.versions: dict[str, int] = {}

    def append(self, stream: str, *events: AnyEvent) -> list[Change | None]:
        out: list[Change | None] = []
        for event in events:
            self.position += 1
            self.versions[stream] = self.versions.get(stream, 0) + 1
            envelope = Envelope(
                position=self.position,
                event_id=f"e{self.position}",
                stream_id=stream,
                version=self.versions[stream],
                recorded_at=T0,
                actor="test",
                correlation_id="c",
                event=event,
            )
            out.append(self.world.apply(envelope))
        return out

    def commit(self, plan: Plan) -> None:
        """What the service does once a plan's appends commit."""
        for append in plan.appends.values():
            self.versions[append.stream_id] = append.version
            self.position += len(append.events)
            if append.pipeline is not None:
                self.world.put_pipeline(append.stream_id.removeprefix("pipeline-"), append.pipeline)
            else:
                agent = append.stream_id.removeprefix("agent-")
                self.world.agent_versions[agent] = append.version
                if append.agent is not None:
                    self.world.put_agent(append.agent)
            for pid, ready in plan.ready.items():
                self.world.ready[pid] = ready


def given(*, slots: int = 2) -> tuple[World, Log]:
    world = World()
    log = Log(world)
    log.append("agent-a1", AgentRegistered(agent="a1", hostname="h1", cpu_slots=slots))
    log.append("pipeline-p1", PipelineSubmitted(pipeline_id="p1", spec=CHAIN))
    world.last_seen["a1"] = T0
    return world, log


def plan(world: World, **kwargs: object) -> Plan:
    counter = itertools.count(1)
    return plan_step(world, T0, config=CONFIG, new_id=lambda: f"x{next(counter)}", **kwargs)  # type: ignore[arg-type]


def events(p: Plan, stream: str = "pipeline-p1") -> list[AnyEvent]:
    return [new.event for new in p.appends[stream].events]


def place_a(world: World, log: Log) -> str:
    p = plan(world, dirty=["p1"])
    log.commit(p)
    state = world.pipelines["p1"]
    current = state.stages["a"].current
    assert current is not None
    return current.id


def report_base(attempt: str, stage: str = "a", agent: str = "a1") -> dict[str, object]:
    return {"agent": agent, "sent_at": T0, "pipeline_id": "p1", "stage": stage, "attempt": attempt}


# ---- placement and commands ------------------------------------------------------------------------------


def test_a_ready_stage_is_placed_and_its_command_waits_for_the_commit() -> None:
    world, _ = given()
    p = plan(world, dirty=["p1"])
    append = p.appends["pipeline-p1"]
    (placed,) = events(p)
    assert isinstance(placed, StagePlaced) and placed.stage == "a" and placed.agent == "a1"
    assert append.expected_version == 1 and append.version == 2
    (command,) = append.commands
    assert isinstance(command, RunStage) and command.command_id == placed.attempt == command.attempt
    assert p.commands == [] and p.placed == 1
    assert placed.lease_expires_at == T0 + timedelta(seconds=CONFIG.accept_timeout_s)


def test_no_room_leaves_the_stage_pending_with_a_reason_recorded_once() -> None:
    world, log = given(slots=0)
    p = plan(world, dirty=["p1"])
    (pending,) = events(p)
    assert isinstance(pending, StagePending) and "CPU slot" in pending.reason
    log.commit(p)
    assert plan(world, place_all=True).appends == {}  # same reason: nothing new to record


def test_the_tentative_state_is_the_committed_state() -> None:
    world, log = given()
    p = plan(world, dirty=["p1"])
    log.commit(p)
    state = world.pipelines["p1"]
    assert state.version == 2 and state.stages["a"].status == "running"
    assert world.views({}, heartbeat_timeout_s=None)[0].cpu_slots_used == 1
    assert world.pipelines_on("a1") == ["p1"]


# ---- reports ---------------------------------------------------------------------------------------------


def test_reports_are_admitted_in_order_decided_on_and_settled_by_the_append() -> None:
    world, log = given()
    attempt = place_a(world, log)
    reports = [
        (0, AttemptAcceptedReport(report_id="r1", **report_base(attempt))),  # type: ignore[arg-type]
        (1, AttemptStartedReport(report_id="r2", **report_base(attempt))),  # type: ignore[arg-type]
        (2, AttemptFinishedReport(report_id="r3", outcome="succeeded", **report_base(attempt))),  # type: ignore[arg-type]
    ]
    p = plan(world, reports=reports)
    kinds = [type(e) for e in events(p)]
    assert kinds == [AttemptAccepted, AttemptStarted, StageSucceeded, StagePlaced]  # b placed in the same turn
    append = p.appends["pipeline-p1"]
    assert append.tokens == [0, 1, 2] and append.causation_id == "r1" and append.expected_version == 2
    assert p.acks == []


def test_a_duplicate_report_is_acked_without_an_append_and_an_unknown_pipeline_is_dropped() -> None:
    world, log = given()
    attempt = place_a(world, log)
    log.commit(plan(world, reports=[(0, AttemptAcceptedReport(report_id="r1", **report_base(attempt)))]))  # type: ignore[arg-type]
    p = plan(
        world,
        reports=[
            (0, AttemptAcceptedReport(report_id="r1", **report_base(attempt))),  # type: ignore[arg-type]
            (1, AttemptAcceptedReport(report_id="r9", **{**report_base(attempt), "pipeline_id": "nope"})),  # type: ignore[arg-type]
        ],
    )
    assert p.acks == [0] and p.appends == {}
    assert p.dropped == [(1, "unknown pipeline nope")]


def test_a_heartbeat_renews_leases_and_tells_a_zombie_to_stop() -> None:
    world, log = given()
    attempt = place_a(world, log)
    p = plan(world, reports=[(0, AgentHeartbeat(report_id="h1", agent="a1", sent_at=T0, running_attempts=(attempt,)))])
    assert p.acks == [0] and world.leases[attempt] == T0 + timedelta(seconds=CONFIG.lease_s)
    # The attempt is lost meanwhile (a lease expired); the agent still runs it.
    later = T0 + timedelta(seconds=60)
    lost = plan_step(world, later, dirty=["p1"], config=CONFIG, new_id=lambda: "y")
    log.commit(lost)
    beat = AgentHeartbeat(report_id="h2", agent="a1", sent_at=later, running_attempts=(attempt,))
    p = plan_step(world, later, reports=[(0, beat)], config=CONFIG, new_id=lambda: "z")
    cancels = [c for c in p.commands if isinstance(c, CancelAttempt)]
    assert [c.attempt for c in cancels] == [attempt]


def test_a_silent_agent_is_lost_and_comes_back_with_its_next_heartbeat() -> None:
    world, log = given()
    later = T0 + timedelta(seconds=CONFIG.agent_timeout_s)
    p = plan_step(world, later, config=CONFIG, new_id=lambda: "l1")
    (lost,) = events(p, "agent-a1")
    assert isinstance(lost, AgentLost) and p.appends["agent-a1"].expected_version == 1
    log.commit(p)
    assert world.dead_agents == frozenset({"a1"})
    beat = AgentHeartbeat(report_id="h1", agent="a1", sent_at=later, running_attempts=())
    p = plan_step(world, later, reports=[(5, beat)], config=CONFIG, new_id=lambda: "r1")
    (back,) = events(p, "agent-a1")
    assert isinstance(back, AgentRegistered) and back.cpu_slots == 2
    assert p.appends["agent-a1"].tokens == [5] and p.acks == []


def test_hello_registers_a_new_agent_once() -> None:
    world, log = given()
    hello = AgentHello(report_id="h", agent="a2", sent_at=T0, hostname="h2", cpu_slots=4)
    p = plan(world, reports=[(0, hello)])
    (registered,) = events(p, "agent-a2")
    assert isinstance(registered, AgentRegistered) and p.appends["agent-a2"].expected_version == 0
    assert p.hellos == ["a2"]
    log.commit(p)
    again = plan(world, reports=[(1, hello)])
    assert again.appends == {} and again.acks == [1]


# ---- reconciliation --------------------------------------------------------------------------------------


def test_outstanding_commands_are_derived_from_the_fold() -> None:
    world, log = given()
    attempt = place_a(world, log)
    (run,) = outstanding(world, T0, lease_s=10.0)
    assert isinstance(run, RunStage) and run.command_id == attempt
    log.append("pipeline-p1", PipelineCancelRequested(pipeline_id="p1"))
    (cancel,) = outstanding(world, T0, lease_s=10.0)
    assert isinstance(cancel, CancelAttempt) and cancel.command_id == f"cancel-{attempt}"
    log.append("agent-a1", AgentDrainRequested(agent="a1"))
    drains = [c for c in outstanding(world, T0, lease_s=10.0) if isinstance(c, DrainAgent)]
    assert [d.command_id for d in drains] == ["drain-a1-2"]
    world.reported_draining["a1"] = True
    assert not [c for c in outstanding(world, T0, lease_s=10.0) if isinstance(c, DrainAgent)]


# ---- the world -------------------------------------------------------------------------------------------


def test_own_events_read_back_change_nothing_and_a_gap_asks_for_a_reload() -> None:
    world, log = given()
    p = plan(world, dirty=["p1"])
    log.commit(p)
    before = world.pipelines["p1"]
    placed = p.appends["pipeline-p1"].events[0]
    echo = Envelope(
        position=3,
        event_id=placed.event_id,
        stream_id="pipeline-p1",
        version=2,
        recorded_at=T0,
        actor="scheduler",
        correlation_id="p1",
        event=placed.event,
    )
    assert world.apply(echo) is None and world.pipelines["p1"] is before
    gap = Envelope(
        position=9,
        event_id="g",
        stream_id="pipeline-p1",
        version=5,
        recorded_at=T0,
        actor="api",
        correlation_id="p1",
        event=PipelineCancelRequested(pipeline_id="p1"),
    )
    assert world.apply(gap) == Change("reload", "p1")


def test_an_ended_pipeline_is_retired_and_only_a_retry_request_brings_it_back() -> None:
    world, log = given()
    state: PipelineState = world.pipelines["p1"]
    world.put_pipeline("p1", replace(state, status="failed", finished_at=T0))
    assert world.retire(T0 + timedelta(seconds=301), 300.0) == ["p1"]
    assert "p1" not in world.pipelines
    assert log.append("pipeline-p1", PipelineCancelRequested(pipeline_id="p1")) == [None]
    assert log.append("pipeline-p1", PipelineRetryRequested(pipeline_id="p1", stages=("a",))) == [
        Change("reload", "p1")
    ]


def test_seeding_gives_every_active_attempt_a_grace_lease_and_every_agent_a_fresh_sighting() -> None:
    world, log = given()
    attempt = place_a(world, log)
    later = T0 + timedelta(hours=1)
    world.seed(later, 40.0)
    assert world.leases[attempt] == later + timedelta(seconds=40)
    assert world.last_seen["a1"] == later


def test_a_pipeline_stream_is_live_unless_it_ended_after_its_last_retry_request() -> None:
    assert live(None, None)
    assert not live(7, None)
    assert not live(9, 4)
    assert live(7, 8)
