"""Unit (T9): a hypothesis stateful test of fold + decide + placement + report admission.

Random DAGs run against simulated agents whose reports arrive in random order, duplicated, late,
or never (then leases expire). Checked throughout: no stage is placed before its dependencies allow
it; at most one success per stage; statuses agree with each other; re-applying an event changes
nothing. Checked at the end: snapshot + tail == full fold == fold with every event delivered twice.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from verlyard_scheduler.decide import cancel_request, retry_request
from verlyard_scheduler.fold import AgentState, PipelineState, evolve, fold
from verlyard_scheduler.placement import Placement, ReadyStage, agent_views, place
from verlyard_shared.envelope import Envelope
from verlyard_shared.reports import (
    AttemptAcceptedReport,
    AttemptFinishedReport,
    AttemptProgressReport,
    AttemptStartedReport,
    CheckpointReport,
)
from verlyard_shared.spec import PipelineSpec
from verlyard_shared.validation import validate_pipeline

from .pipeline_world import AnyAttemptReport, World

FATES = ("succeeded", "succeeded", "succeeded", "infra", "user", "lost", "silent")
"""What a simulated agent does with an attempt; `silent` stops reporting after starting."""
AGENTS = (
    AgentState(agent="a1", hostname="h1", cpu_slots=2),
    AgentState(agent="a2", hostname="h2", cpu_slots=1),
)


@st.composite
def dags(draw: st.DrawFn) -> PipelineSpec:
    n = draw(st.integers(min_value=1, max_value=6))
    stages: dict[str, Any] = {}
    for i in range(n):
        needs = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=3)) if i else []
        stages[f"s{i}"] = {
            "kind": "noop",
            "needs": [f"s{j}" for j in needs],
            "when": draw(st.sampled_from(["on_success", "on_success", "on_success", "always", "on_failure"])),
            "retry": {
                "max_attempts": draw(st.integers(1, 3)),
                "initial_delay": draw(st.sampled_from([0, "5s"])),
                "jitter": draw(st.sampled_from(["none", "full"])),
                "retry_on": ["infra", "lost"],
            },
        }
    return validate_pipeline({"name": "prop", "stages": stages})


def satisfied(state: PipelineState, stage: str) -> bool:
    """Whether `stage`'s dependencies allow it to start (the property under test)."""
    spec = state.stage_spec(stage)
    statuses = [state.stages[d].status for d in spec.needs]
    if spec.when == "on_success":
        return all(s == "succeeded" for s in statuses)
    return all(s in ("succeeded", "skipped", "cancelled", "failed") for s in statuses)


class SchedulerMachine(RuleBasedStateMachine):
    world: World
    outbox: list[AnyAttemptReport]

    @initialize(pipeline=dags(), fates=st.lists(st.sampled_from(FATES), min_size=1, max_size=8))
    def start(self, pipeline: PipelineSpec, fates: list[str]) -> None:
        self.world = World(pipeline, lease_s=30)
        self.outbox = []
        self.fates = itertools.cycle(fates)
        self.ids = itertools.count(1)

    def _report(self, cls: type, placement: Placement, attempt: str, **fields: Any) -> AnyAttemptReport:
        return cls(
            report_id=f"r{next(self.ids)}",
            agent=placement.agent,
            sent_at=self.world.now,
            pipeline_id=self.world.pipeline_id,
            stage=placement.stage,
            attempt=attempt,
            **fields,
        )

    @rule()
    def schedule(self) -> None:
        decisions = self.world.decide()
        ready = [d for d in decisions if isinstance(d, ReadyStage)]
        views = agent_views(AGENTS, [self.world.s])
        for result in place(ready, views, self.world.now):
            if not isinstance(result, Placement):
                continue
            assert satisfied(self.world.s, result.stage), (result.stage, self.world.statuses())
            attempt = self.world.place(result.stage, agent=result.agent)
            fate = next(self.fates)
            if fate == "lost":
                continue  # the agent vanished before accepting: the accept deadline passes
            self.outbox.append(self._report(AttemptAcceptedReport, result, attempt))
            self.outbox.append(self._report(AttemptStartedReport, result, attempt))
            self.outbox.append(self._report(AttemptProgressReport, result, attempt, step=1))
            self.outbox.append(self._report(CheckpointReport, result, attempt, step=1, path=f"/c/{attempt}"))
            if fate == "silent":
                continue
            outcome = "succeeded" if fate == "succeeded" else "failed"
            failure = None if fate == "succeeded" else fate
            self.outbox.append(
                self._report(AttemptFinishedReport, result, attempt, outcome=outcome, failure_class=failure)
            )

    @rule(picks=st.lists(st.tuples(st.integers(0, 10_000), st.booleans()), min_size=1, max_size=6))
    def deliver(self, picks: list[tuple[int, bool]]) -> None:
        """Reports arrive in any order; a duplicated one stays queued and arrives again later."""
        for pick, duplicate in picks:
            if not self.outbox:
                return
            index = pick % len(self.outbox)
            report = self.outbox[index] if duplicate else self.outbox.pop(index)
            before = len(self.world.log)
            self.world.report(report)
            if len(self.world.log) > before:
                assert evolve(self.world.s, self.world.log[-1]) == self.world.s

    @rule(seconds=st.sampled_from([1, 6, 31, 61]))
    def tick(self, seconds: int) -> None:
        self.world.advance(seconds)

    @rule(dice=st.integers(0, 7))
    def cancel(self, dice: int) -> None:
        if dice:  # a user cancels now and then, not at every other step
            return
        request = cancel_request(self.world.s)
        if request is not None:
            self.world.append(request)

    @rule()
    def retry(self) -> None:
        request = retry_request(self.world.s)
        if request is not None:
            self.world.append(request)

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "world"):
            return
        state = self.world.s
        for name, stage in state.stages.items():
            # Exactly-once success per run (a retry request starts a new run of the stages it resets).
            assert sum(1 for a in stage.attempts[stage.budget_from :] if a.status == "succeeded") <= 1, name
            if state.retries == 0:
                assert sum(1 for a in stage.attempts if a.status == "succeeded") <= 1, name
            assert (stage.status == "running") == (stage.active_attempt is not None), (name, stage.status)
            assert sum(1 for a in stage.attempts if a.active) <= 1, name
            if stage.status == "succeeded":
                assert stage.current is not None and stage.current.status == "succeeded"
        statuses = {s.status for s in state.stages.values()}
        if state.status == "succeeded":
            assert statuses <= {"succeeded", "skipped"}
        if state.status == "failed":
            assert state.failed_stages and all(state.stages[n].status == "failed" for n in state.failed_stages)
        if state.terminal:
            assert "running" not in statuses and "pending" not in statuses
        assert evolve(state, self.world.log[-1]) == state  # a redelivered event changes nothing

    def teardown(self) -> None:
        if not hasattr(self, "world"):
            return
        log = self.world.log
        full = fold(log)
        assert full == self.world.s
        for k in {1, len(log) // 3, len(log) // 2, len(log) - 1}:
            if 0 < k < len(log):
                snapshot = msgspec.json.decode(msgspec.json.encode(fold(log[:k])), type=PipelineState)
                assert fold(log[k:], snapshot) == full
        doubled: list[Envelope] = [e for envelope in log for e in (envelope, envelope)]
        assert fold(doubled) == full


SchedulerMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSchedulerMachine = SchedulerMachine.TestCase


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pipeline=dags(),
    fates=st.lists(st.sampled_from(FATES), min_size=1, max_size=8),
    rnd=st.randoms(use_true_random=True),
)
def test_random_runs_always_end_consistently(pipeline: PipelineSpec, fates: list[str], rnd: Any) -> None:
    """Whole runs in a random interleaving, then a drain: every run ends (no deadlock), consistently."""
    m = SchedulerMachine()
    m.start(pipeline, fates)
    retried = False
    for _ in range(300):
        if m.world.s.terminal:
            if retried or rnd.random() < 0.5:
                break
            m.retry()
            retried = True
        roll = rnd.random()
        if roll < 0.35:
            m.schedule()
        elif roll < 0.85:
            m.deliver([(rnd.randrange(10_000), rnd.random() < 0.2)])
        elif roll < 0.999:
            m.tick(rnd.choice([1, 6, 31, 61]))
        else:
            m.cancel(0)
        m.consistent()
    for _ in range(200):  # drain: deliver everything, let leases and backoffs pass
        if m.world.s.terminal:
            break
        m.schedule()
        m.deliver([(0, False)] * len(m.outbox))
        m.tick(61)
        m.consistent()
    assert m.world.s.terminal, m.world.statuses()
    m.teardown()


def test_reordered_and_duplicated_reports_of_one_attempt_reach_the_same_end() -> None:
    """Every permutation (with a duplicate) of one attempt's reports ends in the same stage state."""
    ends: set[bytes] = set()
    pipeline = validate_pipeline({"name": "p", "stages": {"a": {"kind": "noop"}}})
    kinds = ("accepted", "started", "checkpoint", "finished", "finished")
    for order in set(itertools.permutations(kinds)):
        w = World(pipeline)
        w.ready()
        w.place("a")
        for kind in order:
            if kind == "finished":
                w.finished("a", outputs={"out": 1})
            elif kind == "checkpoint":
                w.checkpoint("a", 7, "/c/7")
            else:
                getattr(w, kind)("a")
        w.decide()
        stage = w.stage("a")
        assert w.s.status == "succeeded"
        ends.add(msgspec.json.encode((stage.status, stage.outputs, stage.checkpoint_step, stage.current.status)))  # type: ignore[union-attr]
    assert len(ends) == 1
