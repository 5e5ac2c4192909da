"""Pure core: the soak's Jepsen-style checker over a recorded event log, the read models and a fault log.

No I/O: the loader (soak/loader.py) reads the `events`, `pipelines` and `stages` tables, the harness
records what it submitted, which faults it injected and what the API answered while they lasted.
`check` returns a `Verdict`: counts (attempted, acknowledged, completed, lost, duplicated,
unexpected, stale reports rejected) with one `Anomaly` per finding, and recovery times per fault.

What counts as what (a pipeline's history is cut into epochs at each `pipeline.retry_requested`):
- lost: an acknowledged submission missing from the log, a pipeline that never ended, a gap in a
  stream's versions (a dropped event), a pipeline that succeeded while a stage has no success, a read
  model that disagrees with the log.
- duplicated: an event id or a (stream, version) twice, a stage that succeeded twice in one epoch, an
  attempt placed, started or ended twice, a pipeline that ended twice in one epoch.
- unexpected: a stage placed or an attempt running after its pipeline ended, a stage placed before
  its dependencies succeeded (or after one failed), an event naming an attempt never placed, an
  attempt active again after it ended, a success of an attempt that is not the stage's current one,
  an outcome other than the one the harness expected.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

AnomalyKind = Literal["lost", "duplicated", "unexpected"]
Outcome = Literal["succeeded", "failed", "cancelled"]

PIPELINE_END = {"pipeline.succeeded": "succeeded", "pipeline.failed": "failed", "pipeline.cancelled": "cancelled"}
ATTEMPT_END = ("stage.succeeded", "stage.failed", "attempt.lost")
# Events that mean "something ran or is about to run"; none may follow the end of its pipeline.
RUN_EVENTS = ("stage.placed", "attempt.accepted", "attempt.started", "attempt.progressed", "stage.succeeded")
# Events written because an agent's report arrived (what resumes once NATS is back).
REPORT_EVENTS = frozenset(
    {"attempt.accepted", "attempt.started", "attempt.progressed", "checkpoint.saved", "stage.succeeded", "stage.failed"}
)


@dataclass(frozen=True)
class Event:
    """One row of the `events` table (`data` is the decoded jsonb, its `type` tag included)."""

    position: int
    event_id: str
    stream_id: str
    version: int
    type: str
    data: Mapping[str, Any]
    actor: str = ""
    recorded_at: float = 0.0
    """Epoch seconds (server clock)."""


@dataclass(frozen=True)
class Submission:
    """One pipeline the harness tried to submit: `pipeline_id` is None when the API never answered 201."""

    name: str
    pipeline_id: str | None
    acknowledged: bool
    expect: Outcome = "succeeded"


@dataclass(frozen=True)
class Fault:
    """One injected fault: `at` it happened, `back_at` the harness restarted/resumed what it broke."""

    kind: str
    """scheduler_kill, nats_kill, relay_kill, agent_kill, agent_pause, postgres_stop, poison ..."""
    target: str
    at: float
    back_at: float | None = None


@dataclass(frozen=True)
class Probe:
    """One API request made during the run: when, its status, how long it took, its Retry-After."""

    at: float
    status: int
    """0 for no answer (connection refused, timeout)."""
    latency_s: float
    retry_after: str | None = None


@dataclass(frozen=True)
class ReadModel:
    pipelines: Mapping[str, str] = field(default_factory=dict)
    """pipeline id -> status (`pipelines` table)."""
    stages: Mapping[tuple[str, str], str] = field(default_factory=dict)
    """(pipeline id, stage) -> status (`stages` table)."""


@dataclass(frozen=True)
class Anomaly:
    kind: AnomalyKind
    what: str
    pipeline_id: str | None = None
    detail: str = ""


@dataclass
class Verdict:
    attempted: int = 0
    acknowledged: int = 0
    completed: int = 0
    """Pipelines that ended with the outcome the harness expected."""
    events: int = 0
    anomalies: list[Anomaly] = field(default_factory=list)
    stale_rejected: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    """Attempt ends by kind: succeeded, failed (by class), lost."""
    resumed_from_checkpoint: int = 0
    """Retried attempts placed to resume from the stage's latest checkpoint."""
    resume_mismatches: int = 0
    max_in_flight: int = 0
    """The most pipelines submitted and not yet ended at one moment (by the log)."""
    recovery: dict[str, dict[str, float | int]] = field(default_factory=dict)
    """Per fault kind: summaries (n, p50, max seconds) of each recovery measure."""
    probes: dict[str, Any] = field(default_factory=dict)

    def count(self, kind: AnomalyKind) -> int:
        return sum(1 for a in self.anomalies if a.kind == kind)

    @property
    def lost(self) -> int:
        return self.count("lost")

    @property
    def duplicated(self) -> int:
        return self.count("duplicated")

    @property
    def unexpected(self) -> int:
        return self.count("unexpected")

    @property
    def ok(self) -> bool:
        return not self.anomalies

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "attempted": self.attempted,
            "acknowledged": self.acknowledged,
            "completed": self.completed,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "unexpected": self.unexpected,
            "events": self.events,
            "stale_reports_rejected": self.stale_rejected,
            "rejected_reasons": self.rejected_reasons,
            "attempt_ends": self.attempts,
            "resumed_from_checkpoint": self.resumed_from_checkpoint,
            "resume_mismatches": self.resume_mismatches,
            "max_in_flight": self.max_in_flight,
            "recovery_s": self.recovery,
            "probes": self.probes,
            "anomalies": [a.__dict__ for a in self.anomalies[:200]],
            "anomalies_total": len(self.anomalies),
        }


# ---- the checks ------------------------------------------------------------------------------------------


def check(
    events: Sequence[Event],
    submissions: Sequence[Submission],
    read_model: ReadModel | None = None,
    faults: Sequence[Fault] = (),
    probes: Sequence[Probe] = (),
) -> Verdict:
    """Everything the soak promises, checked over what was recorded (see the module docstring)."""
    verdict = Verdict(
        attempted=len(submissions),
        acknowledged=sum(1 for s in submissions if s.acknowledged),
        events=len(events),
    )
    add = verdict.anomalies.append
    _check_identity(events, add)
    streams: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        streams[event.stream_id].append(event)
    for stream in streams.values():
        stream.sort(key=lambda e: (e.version, e.position))
        _check_versions(stream, add)
    outcomes: dict[str, Outcome | None] = {}
    for stream_id, stream in streams.items():
        if stream_id.startswith("pipeline-"):
            outcomes[stream_id.removeprefix("pipeline-")] = _check_pipeline(stream, add, verdict)
    for sub in submissions:
        if not sub.acknowledged or sub.pipeline_id is None:
            continue
        if sub.pipeline_id not in outcomes:
            add(Anomaly("lost", "acknowledged pipeline missing from the log", sub.pipeline_id, sub.name))
            continue
        got = outcomes[sub.pipeline_id]
        if got is None:
            add(Anomaly("lost", "pipeline never ended", sub.pipeline_id, sub.name))
        elif got != sub.expect:
            add(Anomaly("unexpected", f"pipeline {got}, expected {sub.expect}", sub.pipeline_id, sub.name))
        else:
            verdict.completed += 1
    if read_model is not None:
        _check_read_model(streams, read_model, add)
    for event in events:
        if event.type == "report.rejected":
            verdict.stale_rejected += 1
            reason = str(event.data.get("reason", ""))
            key = reason.split(":", 1)[0].split(" ", 1)[0] if reason else "?"
            verdict.rejected_reasons[key] = verdict.rejected_reasons.get(key, 0) + 1
    verdict.max_in_flight = max_in_flight(events)
    verdict.recovery = recovery_times(events, faults)
    verdict.probes = summarise_probes(probes, faults)
    return verdict


def max_in_flight(events: Iterable[Event]) -> int:
    """The most pipelines open at once: submitted (or asked to retry) and not yet ended, in log order."""
    open_: set[str] = set()
    most = 0
    for event in sorted(events, key=lambda e: e.position):
        if event.type in ("pipeline.submitted", "pipeline.retry_requested"):
            open_.add(event.stream_id)
            most = max(most, len(open_))
        elif event.type in PIPELINE_END:
            open_.discard(event.stream_id)
    return most


def _check_identity(events: Sequence[Event], add: Any) -> None:
    for event_id, n in Counter(e.event_id for e in events).items():
        if n > 1:
            add(Anomaly("duplicated", "event id recorded twice", None, f"{event_id} x{n}"))
    for position, n in Counter(e.position for e in events).items():
        if n > 1:
            add(Anomaly("duplicated", "position recorded twice", None, f"{position} x{n}"))


def _pid(stream: Sequence[Event]) -> str | None:
    sid = stream[0].stream_id if stream else ""
    return sid.removeprefix("pipeline-") if sid.startswith("pipeline-") else None


def _check_versions(stream: Sequence[Event], add: Any) -> None:
    """Versions of a stream run 1..n without a gap (a gap is a dropped event) or a repeat."""
    expected = 1
    for event in stream:
        if event.version < expected:
            add(
                Anomaly(
                    "duplicated", "stream version recorded twice", _pid(stream), f"{event.stream_id}@{event.version}"
                )
            )
            continue
        if event.version > expected:
            add(
                Anomaly(
                    "lost",
                    "gap in stream versions (dropped event)",
                    _pid(stream),
                    f"{event.stream_id}: versions {expected}..{event.version - 1} missing",
                )
            )
        expected = event.version + 1


@dataclass
class _Attempt:
    id: str
    stage: str
    agent: str
    placed_version: int
    resume_from_step: int | None
    starts: int = 0
    ended: str | None = None


@dataclass
class _Epoch:
    succeeded: Counter[str] = field(default_factory=Counter)
    failed_for_good: set[str] = field(default_factory=set)
    ended: str | None = None


def _needs(submitted: Event) -> dict[str, tuple[list[str], str]]:
    stages = submitted.data.get("spec", {}).get("stages", {})
    out: dict[str, tuple[list[str], str]] = {}
    for name, spec in stages.items():
        out[str(name)] = ([str(n) for n in spec.get("needs", [])], str(spec.get("when", "on_success")))
    return out


def _downstream(needs: Mapping[str, tuple[list[str], str]], roots: set[str]) -> set[str]:
    """`roots` and every stage that needs one of them, transitively."""
    out = set(roots)
    grew = True
    while grew:
        grew = False
        for name, (deps, _) in needs.items():
            if name not in out and out.intersection(deps):
                out.add(name)
                grew = True
    return out


def _check_pipeline(stream: Sequence[Event], add: Any, verdict: Verdict) -> Outcome | None:
    """One pipeline's history; returns how its last epoch ended (None: it did not)."""
    pid = _pid(stream)
    if not stream or stream[0].type != "pipeline.submitted":
        add(Anomaly("lost", "pipeline stream does not start with pipeline.submitted", pid))
        return None
    needs = _needs(stream[0])
    attempts: dict[str, _Attempt] = {}
    current: dict[str, str] = {}
    checkpoint: dict[str, int] = {}
    epoch = _Epoch()
    outcome: Outcome | None = None
    for event in stream[1:]:
        data, kind = event.data, event.type
        stage = str(data.get("stage", ""))
        aid = data.get("attempt")
        if kind == "pipeline.retry_requested":
            # The named stages (and what depends on them) run again; successes elsewhere are kept.
            reset = _downstream(needs, {str(s) for s in data.get("stages", [])} or set(needs))
            kept = Counter({s: n for s, n in epoch.succeeded.items() if s not in reset})
            epoch, outcome = _Epoch(succeeded=kept, failed_for_good=epoch.failed_for_good - reset), None
            for name in reset:
                current.pop(name, None)
                checkpoint.pop(name, None)
            continue
        if kind in PIPELINE_END:
            if epoch.ended is not None:
                add(Anomaly("duplicated", "pipeline ended twice", pid, f"{epoch.ended} then {kind}"))
            epoch.ended = kind
            outcome = PIPELINE_END[kind]  # type: ignore[assignment]
            if kind == "pipeline.succeeded":
                missing = [s for s in needs if epoch.succeeded[s] == 0]
                if missing:
                    add(Anomaly("lost", "pipeline succeeded but stages have no success", pid, ",".join(missing)))
            continue
        if epoch.ended is not None and kind in RUN_EVENTS:
            add(Anomaly("unexpected", f"{kind} after the pipeline ended", pid, f"{stage} {aid} after {epoch.ended}"))
        if kind == "stage.placed":
            _placed(event, pid, needs, epoch, attempts, current, checkpoint, add, verdict)
            continue
        if kind == "checkpoint.saved":
            checkpoint[stage] = max(checkpoint.get(stage, 0), int(data.get("step", 0)))
        if aid is None or kind in ("report.rejected", "stage.pending", "stage.skipped"):
            if kind == "stage.failed":
                epoch.failed_for_good.add(stage)
            continue
        attempt = attempts.get(str(aid))
        if attempt is None:
            add(Anomaly("unexpected", f"{kind} names an attempt never placed", pid, f"{stage} {aid}"))
            continue
        _attempt_event(event, pid, attempt, current, epoch, add, verdict)
    return outcome


def _placed(
    event: Event,
    pid: str | None,
    needs: Mapping[str, tuple[list[str], str]],
    epoch: _Epoch,
    attempts: dict[str, _Attempt],
    current: dict[str, str],
    checkpoint: Mapping[str, int],
    add: Any,
    verdict: Verdict,
) -> None:
    data = event.data
    stage, aid = str(data.get("stage", "")), str(data.get("attempt", ""))
    if aid in attempts:
        add(Anomaly("duplicated", "attempt placed twice", pid, f"{stage} {aid}"))
        return
    deps, when = needs.get(stage, ([], "on_success"))
    if when == "on_success":
        for dep in deps:
            if dep in epoch.failed_for_good and epoch.succeeded[dep] == 0:
                add(Anomaly("unexpected", "stage placed after a dependency failed", pid, f"{stage} after {dep}"))
            elif epoch.succeeded[dep] == 0:
                add(Anomaly("unexpected", "stage placed before its dependency succeeded", pid, f"{stage} before {dep}"))
    if epoch.succeeded[stage]:
        add(Anomaly("unexpected", "stage placed again after it succeeded", pid, f"{stage} {aid}"))
    resume = data.get("resume_from_step")
    previous = current.get(stage)
    if previous is not None and stage in checkpoint:
        # A retry must resume from the latest checkpoint recorded before it was placed.
        if resume == checkpoint[stage]:
            verdict.resumed_from_checkpoint += 1
        else:
            verdict.resume_mismatches += 1
            add(
                Anomaly(
                    "unexpected",
                    "retry does not resume from the latest checkpoint",
                    pid,
                    f"{stage} {aid}: resume_from_step={resume}, latest checkpoint {checkpoint[stage]}",
                )
            )
    attempts[aid] = _Attempt(aid, stage, str(data.get("agent", "")), event.version, resume)
    current[stage] = aid


def _attempt_event(
    event: Event,
    pid: str | None,
    attempt: _Attempt,
    current: Mapping[str, str],
    epoch: _Epoch,
    add: Any,
    verdict: Verdict,
) -> None:
    kind, stage = event.type, attempt.stage
    if kind == "attempt.started":
        attempt.starts += 1
        if attempt.starts > 1:
            add(Anomaly("duplicated", "attempt started twice", pid, f"{stage} {attempt.id}"))
    if kind in ("attempt.accepted", "attempt.started", "attempt.progressed") and attempt.ended is not None:
        add(Anomaly("unexpected", f"{kind} after the attempt ended", pid, f"{stage} {attempt.id} ({attempt.ended})"))
    if kind in ATTEMPT_END or (kind == "stage.cancelled" and event.data.get("attempt")):
        if attempt.ended is not None:
            add(Anomaly("duplicated", "attempt ended twice", pid, f"{stage} {attempt.id}: {attempt.ended}, {kind}"))
            return
        attempt.ended = kind
        end = kind.split(".")[-1]
        if kind == "stage.failed":
            end = f"failed:{event.data.get('failure_class', '?')}"
        verdict.attempts[end] = verdict.attempts.get(end, 0) + 1
    if kind == "stage.succeeded":
        if current.get(stage) != attempt.id:
            add(Anomaly("unexpected", "success of an attempt that is not the stage's current one", pid, attempt.id))
        epoch.succeeded[stage] += 1
        if epoch.succeeded[stage] > 1:
            add(Anomaly("duplicated", "stage succeeded twice", pid, f"{stage} (attempt {attempt.id})"))
    if kind == "stage.failed":
        epoch.failed_for_good.add(stage)
    if kind == "stage.placed":  # pragma: no cover - handled by _placed
        return


def _check_read_model(streams: Mapping[str, Sequence[Event]], model: ReadModel, add: Any) -> None:
    for stream_id, stream in streams.items():
        if not stream_id.startswith("pipeline-"):
            continue
        pid = stream_id.removeprefix("pipeline-")
        expected = _log_status(stream)
        got = model.pipelines.get(pid)
        if got is None:
            add(Anomaly("lost", "pipeline missing from the read model", pid))
        elif expected is not None and got != expected:
            add(Anomaly("lost", "read model disagrees with the log", pid, f"read model {got}, log {expected}"))
        for (rpid, stage), status in model.stages.items():
            if rpid != pid or expected != "succeeded":
                continue
            if status != "succeeded":
                add(Anomaly("lost", "read model stage disagrees with the log", pid, f"{stage}: {status}"))


def _log_status(stream: Sequence[Event]) -> str | None:
    """The status the log implies once the pipeline ended (None while it runs: not comparable)."""
    status: str | None = None
    for event in stream:
        if event.type in PIPELINE_END:
            status = PIPELINE_END[event.type]
        elif event.type == "pipeline.retry_requested":
            status = None
    return status


# ---- recovery and probes ---------------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    mid = ordered[len(ordered) // 2]
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {"n": len(ordered), "p50": round(mid, 3), "p95": round(p95, 3), "max": round(ordered[-1], 3)}


def _first_after(times: Sequence[float], t: float, until: float = math.inf) -> float | None:
    for x in times:
        if t < x <= until:
            return x
    return None


def _epoch(value: object, default: float) -> float:
    """An ISO-8601 time from an event's data as epoch seconds (`default` when absent or unreadable)."""
    if not isinstance(value, str):
        return default
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return default


def recovery_times(events: Iterable[Event], faults: Sequence[Fault]) -> dict[str, dict[str, float | int]]:
    """Per fault kind, how long after the harness brought the component back the system moved again.

    - `first_scheduler_event_s`: the first event the scheduler appended after `back_at` (T1's "first
      command after restart"; it only means something while work is pending, which the soak ensures).
    - `first_report_event_s`: the first event written from an agent's report after `back_at` (T2's
      "consumers resume after NATS is back").
    - agent faults: `lost_detected_s` (fault to the loss of an attempt on that agent: `attempt.lost`,
      or `stage.failed` of class lost when the restarted agent reports it), `replaced_s` (that loss to
      the stage's next `stage.placed`, the stage's own retry backoff included) and
      `replaced_after_backoff_s` (from the later of the loss and the backoff's `not_before`: what the
      scheduler itself adds, waiting for a free slot included), `replaced_after_slot_s` (from the
      later of that and the first moment some live agent had a free CPU slot, by the log: the
      scheduler's decision alone) and `waited_for_slot` (one 1.0 per replacement that found every
      live agent full at `not_before`, so a slow `replaced_after_backoff_s` can be told from a queue),
      and `agent_report_s` (`back_at` to the first report of an attempt on that agent: its link moves).
    """
    ordered = sorted(events, key=lambda e: e.position)
    sched = sorted(e.recorded_at for e in ordered if e.actor == "scheduler")
    report = sorted(e.recorded_at for e in ordered if e.type in REPORT_EVENTS)
    measures: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    # An agent that restarts reports its dead attempts itself (stage.failed, class lost); one that does
    # not come back in time gets attempt.lost from the scheduler.
    placed_on = {str(e.data.get("attempt")): str(e.data.get("agent")) for e in ordered if e.type == "stage.placed"}
    losses = [
        e
        for e in ordered
        if e.type == "attempt.lost" or (e.type == "stage.failed" and e.data.get("failure_class") == "lost")
    ]
    by_agent: dict[str, list[float]] = defaultdict(list)
    for e in ordered:
        if e.type in REPORT_EVENTS and str(e.data.get("attempt")) in placed_on:
            by_agent[placed_on[str(e.data.get("attempt"))]].append(e.recorded_at)
    free = _free_slot_timeline(ordered)
    for fault in faults:
        start = fault.back_at if fault.back_at is not None else fault.at
        nxt = _first_after(sched, start)
        if nxt is not None:
            measures[fault.kind]["first_scheduler_event_s"].append(nxt - start)
        nxt = _first_after(report, start)
        if nxt is not None:
            measures[fault.kind]["first_report_event_s"].append(nxt - start)
        if fault.kind.startswith("agent"):
            nxt = _first_after(by_agent[fault.target], start)
            if nxt is not None:
                measures[fault.kind]["agent_report_s"].append(nxt - start)
            later = [f.at for f in faults if f.target == fault.target and f.at > fault.at]
            until = min(later, default=fault.at + 120.0)
            for lost in losses:
                if lost.data.get("agent", placed_on.get(str(lost.data.get("attempt")))) != fault.target:
                    continue
                if not fault.at <= lost.recorded_at < until:
                    continue
                measures[fault.kind]["lost_detected_s"].append(lost.recorded_at - fault.at)
                not_before = lost.recorded_at
                for placed in ordered:
                    if placed.position <= lost.position or placed.stream_id != lost.stream_id:
                        continue
                    if placed.data.get("stage") != lost.data.get("stage"):
                        continue
                    if placed.type == "stage.retry_scheduled":
                        not_before = max(not_before, _epoch(placed.data.get("not_before"), not_before))
                    if placed.type == "stage.placed":
                        measures[fault.kind]["replaced_s"].append(placed.recorded_at - lost.recorded_at)
                        measures[fault.kind]["replaced_after_backoff_s"].append(
                            max(0.0, placed.recorded_at - not_before)
                        )
                        slot_at = _free_from(free, not_before)
                        measures[fault.kind]["waited_for_slot"].append(1.0 if slot_at > not_before else 0.0)
                        measures[fault.kind]["replaced_after_slot_s"].append(
                            max(0.0, placed.recorded_at - min(slot_at, placed.recorded_at))
                        )
                        break
    return {
        f"{kind}.{name}": {"n": len(values), "waited": int(sum(values))}
        if name == "waited_for_slot"
        else summary(values)
        for kind, by_name in measures.items()
        for name, values in by_name.items()
    }


def _free_slot_timeline(ordered: Sequence[Event]) -> list[tuple[float, bool]]:
    """After each event, whether some live agent had a free CPU slot (capacity from the latest
    `agent.registered`, occupancy = its placed attempts not yet ended; `agent.lost` and
    `agent.deregistered` take an agent out). Soak stages are CPU stages, one slot each."""
    capacity: dict[str, int] = {}
    live: set[str] = set()
    running: dict[str, set[str]] = defaultdict(set)
    where: dict[str, str] = {}
    out: list[tuple[float, bool]] = []
    for e in ordered:
        agent = str(e.data.get("agent", ""))
        aid = str(e.data.get("attempt", ""))
        if e.type == "agent.registered":
            capacity[agent] = int(e.data.get("cpu_slots", 1))
            live.add(agent)
        elif e.type in ("agent.lost", "agent.deregistered"):
            live.discard(agent)
        elif e.type == "stage.placed":
            running[agent].add(aid)
            where[aid] = agent
        elif (e.type in ATTEMPT_END or e.type == "stage.cancelled") and aid in where:
            running[where.pop(aid)].discard(aid)
        out.append((e.recorded_at, any(len(running[a]) < capacity.get(a, 0) for a in live)))
    return out


def _free_from(timeline: Sequence[tuple[float, bool]], t: float) -> float:
    """The first moment at or after `t` some live agent had a free slot (`t` when the log says nothing)."""
    state = True
    for at, free in timeline:
        if at > t:
            if state:
                return t
            if free:
                return at
        state = free
    return t


def summarise_probes(
    probes: Sequence[Probe], faults: Sequence[Fault], outages: Collection[str] = ("postgres_stop",)
) -> dict[str, Any]:
    """What the API answered: status counts, the slowest answer, 5xx other than 503, 503s without
    Retry-After, and per outage (a fault of a kind in `outages`) how long after `back_at` the API
    served a 2xx again."""
    if not probes:
        return {}
    statuses = Counter(str(p.status) for p in probes)
    back: list[float] = []
    for fault in faults:
        if fault.back_at is None or fault.kind not in outages:
            continue
        ok = _first_after(sorted(p.at + p.latency_s for p in probes if 200 <= p.status < 300), fault.back_at)
        if ok is not None:
            back.append(ok - fault.back_at)
    return {
        "n": len(probes),
        "statuses": dict(statuses),
        "max_latency_s": round(max(p.latency_s for p in probes), 3),
        "server_errors_not_503": sum(1 for p in probes if p.status >= 500 and p.status != 503),
        "no_answer": statuses.get("0", 0),
        "503_without_retry_after": sum(1 for p in probes if p.status == 503 and not p.retry_after),
        "serving_again_s": summary(back),
    }


# ---- the summary -----------------------------------------------------------------------------------------


def render(scenario: str, verdict: Verdict) -> str:
    """The Jepsen-style summary printed at the end of a run."""
    lines = [
        f"== soak {scenario}: {'VALID' if verdict.ok else 'INVALID'} ==",
        f"  attempted      {verdict.attempted}",
        f"  acknowledged   {verdict.acknowledged}",
        f"  completed      {verdict.completed}",
        f"  lost           {verdict.lost}",
        f"  duplicated     {verdict.duplicated}",
        f"  unexpected     {verdict.unexpected}",
        f"  events         {verdict.events}",
        f"  stale reports rejected  {verdict.stale_rejected} {verdict.rejected_reasons or ''}",
        f"  attempt ends   {dict(sorted(verdict.attempts.items()))}",
        f"  resumed from checkpoint {verdict.resumed_from_checkpoint}",
        f"  max pipelines in flight {verdict.max_in_flight}",
    ]
    for name, s in sorted(verdict.recovery.items()):
        lines.append(f"  recovery {name}: {s}")
    if verdict.probes:
        p = verdict.probes
        lines.append(
            f"  api probes: {p['statuses']} max latency {p['max_latency_s']} s, "
            f"5xx-not-503 {p['server_errors_not_503']}, serving again {p['serving_again_s']}"
        )
    for anomaly in verdict.anomalies[:20]:
        lines.append(f"  ! {anomaly.kind}: {anomaly.what} [{anomaly.pipeline_id}] {anomaly.detail}")
    if len(verdict.anomalies) > 20:
        lines.append(f"  ... {len(verdict.anomalies) - 20} more anomalies")
    return "\n".join(lines)
