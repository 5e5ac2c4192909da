"""The soak checker (soak/checker.py) over recorded histories, and its mutation check: each injected
bug (a dropped event, a double-run stage, a replayed event id, ...) is reported as what it is."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from soak.checker import Event, Fault, Probe, ReadModel, Submission, check, render

FIXTURES = Path(__file__).parent.parent / "fixtures" / "event_logs"
PID = "p1"
SID = f"pipeline-{PID}"
STAGES = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["d"]}


class History:
    """Builds one pipeline's events the way the scheduler would record them."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.t = 1000.0

    def add(self, type_: str, actor: str = "scheduler", **data: Any) -> Event:
        self.t += 0.1
        n = len(self.events) + 1
        event = Event(
            position=n,
            event_id=f"e{n}",
            stream_id=SID,
            version=sum(1 for e in self.events if e.stream_id == SID) + 1,
            type=type_,
            data={"type": type_, "pipeline_id": PID, **data},
            actor=actor,
            recorded_at=self.t,
        )
        self.events.append(event)
        return event

    def run(self, stage: str, attempt: str, *, agent: str = "a1", resume: int | None = None, end: str = "ok") -> None:
        self.add("stage.placed", stage=stage, attempt=attempt, attempt_number=1, agent=agent, resume_from_step=resume)
        self.add("attempt.accepted", stage=stage, attempt=attempt, agent=agent)
        self.add("attempt.started", stage=stage, attempt=attempt, agent=agent)
        self.add("checkpoint.saved", stage=stage, attempt=attempt, step=(resume or 0) + 1, path="x")
        if end == "ok":
            self.add("stage.succeeded", stage=stage, attempt=attempt)
        elif end == "lost":
            self.add("attempt.lost", stage=stage, attempt=attempt, agent=agent, reason="agent killed")
        else:
            self.add("stage.failed", stage=stage, attempt=attempt, failure_class=end)


def clean() -> History:
    """A 5-stage fan-in pipeline whose stage b lost an attempt and resumed from its checkpoint."""
    h = History()
    spec = {
        "name": "soak",
        "stages": {s: {"kind": "noop", "needs": n, "when": "on_success"} for s, n in STAGES.items()},
    }
    h.add("pipeline.submitted", actor="api", spec=spec)
    h.run("a", "a-1")
    h.run("b", "b-1", end="lost")
    h.add("report.rejected", stage="b", attempt="b-1", agent="a1", report_type="rpt.finished", reason="stale attempt")
    h.run("b", "b-2", agent="a2", resume=1)
    h.run("c", "c-1")
    h.run("d", "d-1")
    h.run("e", "e-1")
    h.add("pipeline.succeeded")
    return h


def submitted(expect: str = "succeeded") -> list[Submission]:
    return [Submission(name="soak", pipeline_id=PID, acknowledged=True, expect=expect)]  # type: ignore[arg-type]


def model(status: str = "succeeded") -> ReadModel:
    return ReadModel(pipelines={PID: status}, stages={(PID, s): "succeeded" for s in STAGES})


def renumber(events: list[Event]) -> list[Event]:
    """Positions and versions 1..n again (for mutations that insert or move events consistently)."""
    return [
        Event(i, e.event_id, e.stream_id, i, e.type, e.data, e.actor, e.recorded_at)
        for i, e in enumerate(events, start=1)
    ]


def test_a_clean_history_is_valid() -> None:
    verdict = check(clean().events, submitted(), model())
    assert verdict.ok, render("clean", verdict)
    assert (verdict.attempted, verdict.acknowledged, verdict.completed) == (1, 1, 1)
    assert verdict.stale_rejected == 1
    assert verdict.resumed_from_checkpoint == 1
    assert verdict.attempts == {"succeeded": 5, "lost": 1}
    assert "VALID" in render("clean", verdict)


def _drop(type_: str, stage: str) -> Callable[[list[Event]], list[Event]]:
    def mutate(events: list[Event]) -> list[Event]:
        victim = next(e for e in events if e.type == type_ and e.data.get("stage") == stage)
        return [e for e in events if e is not victim]

    return mutate


def _double_run(events: list[Event]) -> list[Event]:
    """Stage c runs a second attempt after its first succeeded (and both succeed)."""
    out = list(events)
    at = next(i for i, e in enumerate(out) if e.type == "stage.succeeded" and e.data["stage"] == "c") + 1
    extra = [
        Event(0, "x1", SID, 0, "stage.placed", {"stage": "c", "attempt": "c-2", "agent": "a2"}, "scheduler"),
        Event(0, "x2", SID, 0, "stage.succeeded", {"stage": "c", "attempt": "c-2"}, "scheduler"),
    ]
    return renumber(out[:at] + extra + out[at:])


def _started_twice(events: list[Event]) -> list[Event]:
    out = list(events)
    at = next(i for i, e in enumerate(out) if e.type == "attempt.started" and e.data["stage"] == "d")
    again = Event(0, "x3", SID, 0, "attempt.started", out[at].data, "scheduler")
    return renumber([*out[: at + 1], again, *out[at + 1 :]])


def _event_id_twice(events: list[Event]) -> list[Event]:
    out = list(events)
    e = out[5]
    out[6] = Event(out[6].position, e.event_id, SID, out[6].version, out[6].type, out[6].data, "scheduler")
    return out


def _ran_after_end(events: list[Event]) -> list[Event]:
    late = Event(0, "x4", SID, 0, "attempt.progressed", {"stage": "e", "attempt": "e-1", "step": 9}, "scheduler")
    return renumber([*events, late])


def _placed_before_dependency(events: list[Event]) -> list[Event]:
    """d is placed right after b succeeded, before c did."""
    out = list(events)
    d_placed = next(e for e in out if e.type == "stage.placed" and e.data["stage"] == "d")
    out.remove(d_placed)
    at = next(i for i, e in enumerate(out) if e.type == "stage.placed" and e.data["stage"] == "c")
    return renumber([*out[:at], d_placed, *out[at:]])


def _dependency_failed(events: list[Event]) -> list[Event]:
    """c fails for good, yet d runs."""
    out = []
    for e in events:
        if e.type == "stage.succeeded" and e.data["stage"] == "c":
            e = Event(0, e.event_id, SID, 0, "stage.failed", {**e.data, "failure_class": "user"}, "scheduler")
        out.append(e)
    return renumber(out)


def _zombie_success(events: list[Event]) -> list[Event]:
    """The lost attempt b-1 succeeds after b-2 was placed (fencing failed): ended twice, stale success."""
    out = list(events)
    at = next(i for i, e in enumerate(out) if e.type == "stage.placed" and e.data["attempt"] == "b-2") + 1
    zombie = Event(0, "x5", SID, 0, "stage.succeeded", {"stage": "b", "attempt": "b-1"}, "scheduler")
    return renumber([*out[:at], zombie, *out[at:]])


def _no_resume(events: list[Event]) -> list[Event]:
    out = []
    for e in events:
        if e.type == "stage.placed" and e.data["attempt"] == "b-2":
            e = Event(e.position, e.event_id, SID, e.version, e.type, {**e.data, "resume_from_step": None}, e.actor)
        out.append(e)
    return out


MUTATIONS: dict[str, tuple[Callable[[list[Event]], list[Event]], str, str]] = {
    "dropped stage.succeeded": (_drop("stage.succeeded", "c"), "lost", "gap in stream versions"),
    "dropped checkpoint": (_drop("checkpoint.saved", "a"), "lost", "gap in stream versions"),
    "double-run stage": (_double_run, "duplicated", "stage succeeded twice"),
    "attempt started twice": (_started_twice, "duplicated", "attempt started twice"),
    "event id twice": (_event_id_twice, "duplicated", "event id recorded twice"),
    "ran after the pipeline ended": (_ran_after_end, "unexpected", "after the pipeline ended"),
    "placed before a dependency": (_placed_before_dependency, "unexpected", "before its dependency succeeded"),
    "placed after a dependency failed": (_dependency_failed, "unexpected", "after a dependency failed"),
    "zombie success": (_zombie_success, "duplicated", "attempt ended twice"),
    "retry without resume": (_no_resume, "unexpected", "does not resume from the latest checkpoint"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_the_checker_reports_each_injected_bug(name: str) -> None:
    mutate, kind, what = MUTATIONS[name]
    verdict = check(mutate(clean().events), submitted(), model())
    assert not verdict.ok
    found = [a for a in verdict.anomalies if a.kind == kind and what in a.what]
    assert found, render(name, verdict)


def test_a_dropped_tail_event_is_a_pipeline_that_never_ended() -> None:
    events = clean().events[:-1]  # pipeline.succeeded never recorded: no version gap to see
    verdict = check(events, submitted(), None)
    assert [a.what for a in verdict.anomalies] == ["pipeline never ended"]
    assert verdict.lost == 1


def test_an_acknowledged_submission_missing_from_the_log_is_lost() -> None:
    extra = Submission(name="ghost", pipeline_id="p-ghost", acknowledged=True)
    unacked = Submission(name="refused", pipeline_id=None, acknowledged=False)
    verdict = check(clean().events, [*submitted(), extra, unacked], model())
    assert verdict.attempted == 3 and verdict.acknowledged == 2
    assert [(a.kind, a.pipeline_id) for a in verdict.anomalies] == [("lost", "p-ghost")]


def test_a_read_model_that_disagrees_with_the_log_is_reported() -> None:
    verdict = check(clean().events, submitted(), model("running"))
    assert [a.what for a in verdict.anomalies] == ["read model disagrees with the log"]
    stale_stage = ReadModel(pipelines={PID: "succeeded"}, stages={(PID, "d"): "running"})
    assert [a.what for a in check(clean().events, submitted(), stale_stage).anomalies] == [
        "read model stage disagrees with the log"
    ]


def test_a_wrong_outcome_is_unexpected() -> None:
    verdict = check(clean().events, submitted("failed"), model())
    assert [(a.kind, a.what) for a in verdict.anomalies] == [("unexpected", "pipeline succeeded, expected failed")]


def test_a_retry_request_opens_a_new_epoch() -> None:
    """After pipeline.retry_requested a stage may run and succeed again: not a duplicate."""
    h = clean()
    h.add("pipeline.retry_requested", actor="api", stages=["e"])
    h.run("e", "e-2")
    h.add("pipeline.succeeded")
    assert check(h.events, submitted(), model()).ok


def test_recovery_times_and_probes() -> None:
    events = clean().events
    placed_b2 = next(e for e in events if e.type == "stage.placed" and e.data["attempt"] == "b-2")
    lost = next(e for e in events if e.type == "attempt.lost")
    kill = Fault("agent_kill", "a1", at=lost.recorded_at - 1.0, back_at=lost.recorded_at - 0.5)
    sched = Fault("scheduler_kill", "scheduler", at=events[3].recorded_at, back_at=events[3].recorded_at + 0.05)
    outage = Fault("postgres_stop", "postgres", at=2000.0, back_at=2010.0)
    probes = [
        Probe(2001.0, 503, 0.01, "1"),
        Probe(2005.0, 503, 0.02, None),
        Probe(2009.0, 500, 0.02, None),
        Probe(2011.0, 201, 0.4),
        Probe(2012.0, 0, 5.0),
    ]
    verdict = check(events, submitted(), model(), [kill, sched, outage], probes)
    rec = verdict.recovery
    assert rec["agent_kill.lost_detected_s"]["max"] == pytest.approx(1.0)
    assert rec["agent_kill.replaced_s"]["max"] == pytest.approx(placed_b2.recorded_at - lost.recorded_at)
    assert rec["agent_kill.replaced_after_backoff_s"]["max"] == pytest.approx(placed_b2.recorded_at - lost.recorded_at)
    assert rec["scheduler_kill.first_scheduler_event_s"]["max"] == pytest.approx(0.05)
    p = verdict.probes
    assert p["statuses"] == {"503": 2, "500": 1, "201": 1, "0": 1}
    assert p["server_errors_not_503"] == 1 and p["503_without_retry_after"] == 1 and p["no_answer"] == 1
    assert p["serving_again_s"]["max"] == pytest.approx(1.4)
    assert p["max_latency_s"] == 5.0


def test_replacement_time_after_the_retry_backoff() -> None:
    """The stage's own retry backoff (`not_before`) is not counted against the scheduler."""
    h = History()
    spec = {"name": "soak", "stages": {"a": {"kind": "noop", "needs": [], "when": "on_success"}}}
    h.add("pipeline.submitted", actor="api", spec=spec)
    h.run("a", "a-1", end="lost")
    lost_at = h.t
    not_before = datetime.fromtimestamp(lost_at + 1.5, UTC).isoformat()
    h.add("stage.retry_scheduled", stage="a", attempt="a-1", next_attempt_number=2, not_before=not_before)
    h.t = lost_at + 1.7
    h.run("a", "a-2", resume=1)
    h.add("pipeline.succeeded")
    verdict = check(h.events, submitted(), None, [Fault("agent_kill", "a1", at=lost_at - 1, back_at=lost_at - 0.5)])
    assert verdict.ok, render("backoff", verdict)
    assert verdict.recovery["agent_kill.replaced_s"]["max"] == pytest.approx(1.8, abs=0.01)
    assert verdict.recovery["agent_kill.replaced_after_backoff_s"]["max"] == pytest.approx(0.3, abs=0.01)


def test_a_replacement_that_waited_for_a_free_slot_is_told_apart() -> None:
    """Every live agent full at `not_before`: the wait for a slot shows as `waited_for_slot` and
    `replaced_after_slot_s` (the decision once a slot freed); `agent_report_s` times an agent's link."""
    h = History()
    versions = {"a1": 0, "a2": 0}

    def agent_event(type_: str, agent: str, **data: Any) -> None:
        versions[agent] += 1
        h.t += 0.1
        n = len(h.events) + 1
        body = {"type": type_, "agent": agent, **data}
        h.events.append(Event(n, f"e{n}", f"agent-{agent}", versions[agent], type_, body, "scheduler", h.t))

    agent_event("agent.registered", "a1", hostname="h", cpu_slots=1)
    agent_event("agent.registered", "a2", hostname="h", cpu_slots=1)
    spec = {"name": "soak", "stages": {s: {"kind": "noop", "needs": [], "when": "on_success"} for s in ("a", "c")}}
    h.add("pipeline.submitted", actor="api", spec=spec)
    h.add("stage.placed", stage="a", attempt="a-1", attempt_number=1, agent="a1", resume_from_step=None)
    h.add("attempt.started", stage="a", attempt="a-1", agent="a1")
    h.add("stage.placed", stage="c", attempt="c-1", attempt_number=1, agent="a2", resume_from_step=None)
    h.add("attempt.started", stage="c", attempt="c-1", agent="a2")
    h.add("attempt.lost", stage="a", attempt="a-1", agent="a1", reason="lease expired")
    lost_at = h.t
    agent_event("agent.lost", "a1", reason="lease expired")
    not_before = datetime.fromtimestamp(lost_at + 0.5, UTC).isoformat()
    h.add("stage.retry_scheduled", stage="a", attempt="a-1", next_attempt_number=2, not_before=not_before)
    h.t = lost_at + 1.9
    h.add("stage.succeeded", stage="c", attempt="c-1")  # a2's only slot frees at lost + 2.0
    h.t = lost_at + 2.2
    h.add("stage.placed", stage="a", attempt="a-2", attempt_number=2, agent="a2", resume_from_step=None)
    h.add("stage.succeeded", stage="a", attempt="a-2")
    h.add("pipeline.succeeded")
    faults = [
        Fault("agent_kill", "a1", at=lost_at - 1, back_at=lost_at - 0.5),
        Fault("agent_link_delay", "a2", at=lost_at - 1, back_at=lost_at + 1.5),
    ]
    verdict = check(h.events, submitted(), None, faults)
    assert verdict.ok, render("slots", verdict)
    rec = verdict.recovery
    assert rec["agent_kill.replaced_after_backoff_s"]["max"] == pytest.approx(1.8, abs=0.01)
    assert rec["agent_kill.replaced_after_slot_s"]["max"] == pytest.approx(0.3, abs=0.01)
    assert rec["agent_kill.waited_for_slot"] == {"n": 1, "waited": 1}
    assert rec["agent_link_delay.agent_report_s"]["max"] == pytest.approx(0.5, abs=0.01)


def test_pipelines_in_flight_at_once() -> None:
    a, b = clean().events, clean().events
    shift = len(a)
    b = [
        Event(e.position + shift, f"x{e.event_id}", "pipeline-p2", e.version, e.type, e.data, e.actor, e.recorded_at)
        for e in b
    ]
    assert check(a, submitted()).max_in_flight == 1
    # p2 submitted before p1 ended: two at once.
    order = [*a[:-1], b[0], a[-1], *b[1:]]
    interleaved = [
        Event(i + 1, e.event_id, e.stream_id, e.version, e.type, e.data, e.actor, e.recorded_at)
        for i, e in enumerate(order)
    ]
    assert check(interleaved, []).max_in_flight == 2
    # p2 submitted after p1 ended: one at a time.
    assert check([*a, *b], []).max_in_flight == 1


def test_a_replacement_with_a_free_slot_did_not_wait() -> None:
    h = History()
    spec = {"name": "soak", "stages": {"a": {"kind": "noop", "needs": [], "when": "on_success"}}}
    h.add("pipeline.submitted", actor="api", spec=spec)
    h.run("a", "a-1", end="lost")
    h.run("a", "a-2", agent="a2", resume=1)
    h.add("pipeline.succeeded")
    verdict = check(h.events, submitted(), None, [Fault("agent_kill", "a1", at=h.events[0].recorded_at)])
    assert verdict.recovery["agent_kill.waited_for_slot"] == {"n": 1, "waited": 0}
    after_slot = verdict.recovery["agent_kill.replaced_after_slot_s"]["max"]
    assert after_slot == verdict.recovery["agent_kill.replaced_after_backoff_s"]["max"]


def _fixture_events(path: Path) -> list[Event]:
    events = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        events.append(
            Event(
                row["position"], row["event_id"], row["stream_id"], row["version"], row["event"]["type"], row["event"]
            )
        )
    return events


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.jsonl")), ids=lambda p: p.stem)
def test_recorded_histories_have_no_duplicates_or_unexpected_events(path: Path) -> None:
    """The fixtures the fold is tested on (retries, losses, cancels) are valid histories to the checker."""
    verdict = check(_fixture_events(path), [])
    bad = [a for a in verdict.anomalies if a.kind != "lost" or a.what != "pipeline never ended"]
    assert not bad, render(path.stem, verdict)
