"""Unit: the scheduler's fold and decide, Given/When/Then over events (fixed clock, no I/O)."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest

from verlyard_scheduler.dag import CycleError, ancestors, dependents, descendants, topological_order
from verlyard_scheduler.decide import (
    MAX_FREE_REQUEUES,
    ReadyStage,
    SendCommand,
    cancel_request,
    decide,
    describe_pending,
    next_deadline,
    pending_event,
    retry_request,
    run_command,
)
from verlyard_scheduler.fold import AgentState, FoldError, PipelineState, evolve, evolve_agent, fold
from verlyard_scheduler.ingest import admit_heartbeat, admit_hello, admit_report, attempts_by_id
from verlyard_scheduler.placement import Unplaceable
from verlyard_shared.commands import CancelAttempt, RunStage
from verlyard_shared.events import (
    AgentDeregistered,
    AgentDrainRequested,
    AgentLost,
    AgentRegistered,
    AttemptLost,
    GpuInfo,
    PipelineCancelled,
    PipelineFailed,
    PipelineSucceeded,
    ReportRejected,
    StageCancelled,
    StageFailed,
    StagePlaced,
    StageRetryScheduled,
    StageSkipped,
    StageSucceeded,
    TokenCreated,
)
from verlyard_shared.reports import AgentHeartbeat, AgentHello, AttemptFinishedReport

from .pipeline_world import T0, World, spec

NO_JITTER = {"max_attempts": 3, "backoff": "exponential", "initial_delay": "10s", "max_delay": "15s", "jitter": "none"}


def events_of(world: World, cls: type) -> list:
    return [e.event for e in world.log if isinstance(e.event, cls)]


# ---- dag ---------------------------------------------------------------------------------------------------


def test_topological_order_keeps_declaration_order_for_ties() -> None:
    needs = {"d": ("b", "c"), "b": ("a",), "c": ("a",), "a": ()}
    assert topological_order(needs) == ["a", "b", "c", "d"]
    assert dependents(needs)["a"] == ("b", "c")
    assert descendants(needs, ["b"]) == {"d"}
    assert ancestors(needs, ["d"]) == {"a", "b", "c"}


def test_topological_order_names_a_cycle() -> None:
    with pytest.raises(CycleError, match="a -> b -> a"):
        topological_order({"a": ("b",), "b": ("a",), "c": ()})


# ---- readiness -------------------------------------------------------------------------------------------


def test_chain_runs_in_order_and_succeeds() -> None:
    w = World(spec({"a": {}, "b": {"needs": ["a"]}, "c": {"needs": ["b"]}}))
    assert w.ready() == ["a"]
    assert w.s.status == "pending"
    w.run("a")
    assert w.s.status == "running"
    assert w.ready() == ["b"]
    w.run("b")
    assert w.ready() == ["c"]
    w.run("c")
    w.decide()
    assert w.s.status == "succeeded"
    assert w.types()[-1] == "pipeline.succeeded"


def test_a_placed_stage_is_not_ready_again_and_its_run_command_is_rederived() -> None:
    w = World(spec({"a": {}}))
    w.ready()
    attempt = w.place("a")
    decisions = w.decide()
    assert not [d for d in decisions if isinstance(d, ReadyStage)]
    (send,) = [d for d in decisions if isinstance(d, SendCommand)]
    assert isinstance(send.command, RunStage)
    assert send.command.command_id == attempt  # re-sending dedupes on the bus
    w.accepted("a")
    w.decide()
    assert not w.commands()


def test_diamond_joins_only_after_both_branches() -> None:
    w = World(spec({"a": {}, "b": {"needs": ["a"]}, "c": {"needs": ["a"]}, "d": {"needs": ["b", "c"]}}))
    w.ready()
    w.run("a")
    assert w.ready() == ["b", "c"]
    w.run("c")
    assert w.ready() == ["b"]
    w.run("b")
    assert w.ready() == ["d"]
    w.run("d")
    w.decide()
    assert w.s.status == "succeeded"


def test_wide_fan_in() -> None:
    stages = {f"s{i}": {} for i in range(8)} | {"join": {"needs": [f"s{i}" for i in range(8)]}}
    w = World(spec(stages))
    assert w.ready() == [f"s{i}" for i in range(8)]
    for i in range(7):
        w.run(f"s{i}")
        assert "join" not in w.ready()
    w.run("s7")
    assert w.ready() == ["join"]


def test_ready_stage_carries_priorities_resources_and_fifo_key() -> None:
    w = World(
        spec(
            {"t": {"kind": "train", "with": {"model": "m"}, "priority": 3, "resources": {"gpus": 2}}},
            priority=7,
        )
    )
    (ready,) = [d for d in w.decide() if isinstance(d, ReadyStage)]
    assert (ready.pipeline_priority, ready.priority, ready.queued_at, ready.attempt_number) == (7, 3, 1, 1)
    assert ready.resources.gpus == 2 and ready.kind == "train"


# ---- failure, skips, when ------------------------------------------------------------------------------------


def test_failed_dependency_skips_downstream_but_always_cleanup_runs_and_pipeline_fails_naming_the_stage() -> None:
    w = World(
        spec(
            {
                "prep": {},
                "train": {"needs": ["prep"]},
                "eval": {"needs": ["train"]},
                "cleanup": {"needs": ["eval"], "when": "always"},
            }
        )
    )
    w.ready()
    w.run("prep")
    w.ready()
    w.run("train", "failed", failure_class="user", exit_code=1)
    assert w.ready() == ["cleanup"]
    assert w.stage("eval").status == "skipped"
    assert w.stage("eval").reason == "dependency 'train' failed"
    assert w.s.status == "running"  # cleanup still to run
    w.run("cleanup")
    w.decide()
    assert w.s.status == "failed"
    (failed,) = events_of(w, PipelineFailed)
    assert failed.failed_stages == ("train",)
    assert "train (user" in failed.reason


def test_skip_cascades_through_a_chain_in_one_decision() -> None:
    w = World(spec({"a": {}, "b": {"needs": ["a"]}, "c": {"needs": ["b"]}, "d": {"needs": ["c"]}}))
    w.ready()
    w.run("a", "failed", failure_class="user")
    decisions = w.decide()
    assert [type(d) for d in decisions] == [StageSkipped, StageSkipped, StageSkipped, PipelineFailed]
    assert w.stage("c").reason == "dependency 'b' was skipped"
    assert w.s.reason.startswith("stage failed: a (user")


def test_on_failure_stage_runs_only_when_something_failed() -> None:
    stages = {"a": {}, "b": {"needs": ["a"]}, "alert": {"when": "on_failure"}}
    ok = World(spec(stages))
    assert ok.ready() == ["a"]  # alert waits while anything may still fail
    ok.run("a")
    assert ok.ready() == ["b"]
    ok.run("b")
    ok.decide()
    assert ok.stage("alert").status == "skipped"
    assert ok.stage("alert").reason == "no stage failed (when: on_failure)"
    assert ok.s.status == "succeeded"

    bad = World(spec(stages))
    bad.ready()
    bad.run("a", "failed", failure_class="user")
    assert bad.ready() == ["alert"]
    assert bad.stage("b").status == "skipped"
    bad.run("alert")
    bad.decide()
    assert bad.s.status == "failed"


def test_on_failure_with_needs_waits_for_them_to_finish() -> None:
    w = World(spec({"a": {}, "b": {}, "h": {"needs": ["a", "b"], "when": "on_failure"}}))
    w.ready()
    w.run("a", "failed", failure_class="user")
    assert w.ready() == ["b"]  # h waits for b to finish
    assert describe_pending(w.s, "h", w.now) == "waiting for b to finish"
    w.run("b")
    assert w.ready() == ["h"]


def test_always_runs_after_success_and_after_a_skipped_need() -> None:
    w = World(spec({"a": {}, "b": {"needs": ["a"]}, "c": {"needs": ["b"], "when": "always"}}))
    w.ready()
    w.run("a", "failed", failure_class="user")
    assert w.ready() == ["c"]
    assert w.stage("b").status == "skipped"


def test_independent_branch_keeps_running_after_a_failure() -> None:
    w = World(spec({"a": {}, "b": {"needs": ["a"]}, "x": {}}))
    assert w.ready() == ["a", "x"]
    w.place("x")
    w.run("a", "failed", failure_class="user")
    w.decide()
    assert w.stage("b").status == "skipped" and w.s.status == "running"
    w.accepted("x")
    w.finished("x")
    w.decide()
    assert w.s.status == "failed" and w.s.failed_stages == ("a",)


# ---- retries ----------------------------------------------------------------------------------------------------


def test_retry_with_exponential_backoff_capped_then_budget_exhausted() -> None:
    w = World(spec({"a": {"retry": NO_JITTER | {"retry_on": ["infra"]}}}))
    w.ready()
    w.run("a", "failed", failure_class="infra")
    w.decide()
    (first,) = events_of(w, StageRetryScheduled)
    assert first.not_before == T0 + timedelta(seconds=10)
    assert first.next_attempt_number == 2
    assert w.stage("a").status == "pending"
    assert w.ready() == []  # backing off
    assert (
        describe_pending(w.s, "a", w.now)
        == f"retrying after a infra failure; not before {first.not_before.isoformat()}"
    )
    assert next_deadline(w.s) == first.not_before
    w.advance(10)
    decisions = w.decide()
    (ready,) = [d for d in decisions if isinstance(d, ReadyStage)]
    assert ready.attempt_number == 2
    w.run("a", "failed", failure_class="infra")
    w.decide()
    second = events_of(w, StageRetryScheduled)[-1]
    assert second.not_before == w.now + timedelta(seconds=15)  # 20s capped at max_delay 15s
    w.advance(15)
    w.ready()
    w.run("a", "failed", failure_class="infra")
    w.decide()
    assert len(events_of(w, StageRetryScheduled)) == 2
    assert w.s.status == "failed"
    assert "3 attempts" in w.s.reason


def test_fixed_backoff() -> None:
    w = World(spec({"a": {"retry": NO_JITTER | {"backoff": "fixed", "retry_on": ["infra"]}}}))
    w.ready()
    w.run("a", "failed", failure_class="infra")
    w.decide()
    w.advance(10)
    w.ready()
    w.run("a", "failed", failure_class="infra")
    w.decide()
    assert [e.not_before - T0 for e in events_of(w, StageRetryScheduled)] == [
        timedelta(seconds=10),
        timedelta(seconds=20),
    ]


def test_failure_class_not_in_retry_on_is_not_retried() -> None:
    w = World(spec({"a": {"retry": NO_JITTER | {"retry_on": ["infra"]}}}))
    w.ready()
    w.run("a", "failed", failure_class="user")
    w.decide()
    assert not events_of(w, StageRetryScheduled)
    assert w.s.status == "failed"


def test_full_jitter_is_deterministic_or_drawn_from_the_injected_source() -> None:
    w = World(spec({"a": {"retry": NO_JITTER | {"jitter": "full", "retry_on": ["infra"]}}}))
    w.ready()
    w.run("a", "failed", failure_class="infra")
    one = decide(w.s, w.now)
    two = decide(w.s, w.now)
    assert one == two
    (scheduled,) = [d for d in one if isinstance(d, StageRetryScheduled)]
    assert T0 <= scheduled.not_before <= T0 + timedelta(seconds=10)
    (half,) = [d for d in decide(w.s, w.now, rng=lambda: 0.5) if isinstance(d, StageRetryScheduled)]
    assert half.not_before == T0 + timedelta(seconds=5)


def test_a_retried_stage_resumes_from_its_latest_checkpoint() -> None:
    w = World(spec({"t": {"kind": "train", "with": {"model": "m"}, "retry": NO_JITTER}}))
    w.ready()
    w.place("t")
    w.accepted("t")
    w.started("t")
    w.checkpoint("t", 100, "/ckpt/global_step_100")
    w.checkpoint("t", 50, "/ckpt/global_step_50")  # late and older: ignored
    w.finished("t", "failed", failure_class="preempted")
    w.decide()
    w.advance(10)
    w.ready()
    w.place("t")
    placed = events_of(w, StagePlaced)[-1]
    assert (placed.attempt_number, placed.resume_from_step, placed.resume_from_path) == (
        2,
        100,
        "/ckpt/global_step_100",
    )
    command = run_command(w.s, "t", w.attempt("t"), now=w.now, lease_s=30)
    assert command.resume_from_path == "/ckpt/global_step_100"


# ---- leases and timeouts ------------------------------------------------------------------------------------------


def test_lease_expiry_declares_the_attempt_lost_cancels_it_and_retries() -> None:
    w = World(spec({"a": {"retry": NO_JITTER}}), lease_s=30)
    w.ready()
    attempt = w.place("a")
    w.accepted("a")
    w.started("a")
    w.advance(29)
    w.decide()
    assert w.attempt("a").status == "running"
    w.advance(1)
    decisions = w.decide()
    (lost,) = [d for d in decisions if isinstance(d, AttemptLost)]
    assert lost.attempt == attempt and "lease expired" in lost.reason
    (cancel,) = [d.command for d in decisions if isinstance(d, SendCommand)]
    assert isinstance(cancel, CancelAttempt) and cancel.attempt == attempt and cancel.agent == "a1"
    assert w.attempt("a").failure_class == "lost"
    assert any(isinstance(d, StageRetryScheduled) for d in decisions)  # lost is in the default retry_on


def test_heartbeat_renewed_lease_keeps_the_attempt_alive() -> None:
    w = World(spec({"a": {}}), lease_s=30)
    w.ready()
    attempt = w.place("a")
    w.accepted("a")
    w.advance(45)
    w.decide(leases={attempt: w.now + timedelta(seconds=20)})
    assert w.attempt("a").active
    assert next_deadline(w.s, leases={attempt: w.now + timedelta(seconds=20)}, lease_s=30) == w.now + timedelta(
        seconds=20
    )


def test_progress_reports_renew_the_lease() -> None:
    w = World(spec({"a": {}}), lease_s=30)
    w.ready()
    w.place("a")
    w.accepted("a")
    for _ in range(5):
        w.advance(20)
        w.report(
            msgspec.structs.replace(
                _progress(w, "a", step=int((w.now - T0).total_seconds())),
            )
        )
        w.decide()
    assert w.attempt("a").status == "running" and w.attempt("a").step == 100


def _progress(w: World, stage: str, *, step: int):
    from verlyard_shared.reports import AttemptProgressReport

    return AttemptProgressReport(**w._base(stage, None, None), step=step, total_steps=1000)


def test_an_attempt_not_accepted_in_time_is_requeued_at_once_without_using_the_budget() -> None:
    w = World(spec({"a": {"retry": {"max_attempts": 1}}}))
    w.ready()
    for i in range(MAX_FREE_REQUEUES):
        w.place("a", accept_timeout_s=60)
        w.advance(60)
        decisions = w.decide()
        (lost,) = [d for d in decisions if isinstance(d, AttemptLost)]
        assert "did not accept" in lost.reason
        (ready,) = [d for d in decisions if isinstance(d, ReadyStage)]
        assert ready.attempt_number == i + 2
    w.place("a")
    w.accepted("a")
    w.finished("a")
    w.decide()
    assert w.s.status == "succeeded"


def test_endless_unaccepted_placements_eventually_fail() -> None:
    w = World(spec({"a": {"retry": {"max_attempts": 1}}}))
    w.ready()
    for _ in range(MAX_FREE_REQUEUES + 1):
        w.place("a", accept_timeout_s=60)
        w.advance(60)
        w.decide()
    assert w.s.status == "failed"


def test_timeout_fails_the_attempt_with_class_timeout_and_cancels_it() -> None:
    w = World(spec({"a": {"timeout": "10m"}}), lease_s=10_000)
    w.ready()
    attempt = w.place("a")
    w.accepted("a")
    w.started("a")
    assert next_deadline(w.s, lease_s=10_000) == T0 + timedelta(minutes=10)
    w.advance(599)
    w.decide()
    assert w.attempt("a").active
    w.advance(1)
    decisions = w.decide()
    (failed,) = [d for d in decisions if isinstance(d, StageFailed)]
    assert failed.failure_class == "timeout" and failed.reason == "ran longer than the stage timeout of 10m"
    assert [d.command.attempt for d in decisions if isinstance(d, SendCommand)] == [attempt]
    assert w.s.status == "failed"  # timeout is not in the default retry_on
    # The agent's late report of that attempt is stale: rejected and audited.
    (rejected,) = w.finished("a", "cancelled")
    assert isinstance(rejected, ReportRejected) and "declared failed" in rejected.reason


def test_attempts_on_a_lost_agent_are_lost_at_once() -> None:
    w = World(spec({"a": {}}))
    w.ready()
    w.place("a", agent="gpu-1")
    w.accepted("a")
    decisions = w.decide(dead_agents={"gpu-1"})
    (lost,) = [d for d in decisions if isinstance(d, AttemptLost)]
    assert lost.reason == "agent gpu-1 was lost"


# ---- cancellation -------------------------------------------------------------------------------------------------


def test_cancel_stops_pending_stages_at_once_cancels_running_ones_then_ends_cancelled() -> None:
    w = World(spec({"a": {}, "b": {"needs": ["a"]}, "x": {}}))
    w.ready()
    attempt = w.place("a")
    w.accepted("a")
    w.cancel("user said stop")
    assert cancel_request(w.s) is None  # already under way
    decisions = w.decide()
    assert w.stage("b").status == "cancelled" and w.stage("x").status == "cancelled"
    (cancel,) = [d.command for d in decisions if isinstance(d, SendCommand)]
    assert isinstance(cancel, CancelAttempt) and cancel.attempt == attempt
    assert cancel.reason == "pipeline cancelled: user said stop"
    assert not [d for d in decisions if isinstance(d, ReadyStage)]
    assert w.s.status == "running"
    w.finished("a", "cancelled")
    w.decide()
    assert w.stage("a").status == "cancelled"
    assert w.s.status == "cancelled" and w.s.reason == "pipeline cancelled: user said stop"
    assert cancel_request(w.s) is None


def test_cancel_with_nothing_running_ends_at_once_and_stops_a_pending_retry() -> None:
    w = World(spec({"a": {"retry": NO_JITTER}}))
    w.ready()
    w.run("a", "failed", failure_class="infra")
    w.decide()
    assert w.stage("a").status == "pending"  # backing off
    w.cancel()
    decisions = w.decide()
    assert [type(d) for d in decisions] == [StageCancelled, PipelineCancelled]


def test_cancel_keeps_a_permanently_failed_stage_failed() -> None:
    w = World(spec({"a": {}, "x": {}}))
    w.ready()
    w.place("x")
    w.run("a", "failed", failure_class="user")
    w.decide()
    w.cancel()
    w.decide()
    w.finished("x", "cancelled")
    w.decide()
    assert w.statuses() == {"a": "failed", "x": "cancelled"}
    assert w.s.status == "cancelled"


def test_an_attempt_stopped_without_a_cancel_request_counts_as_preempted() -> None:
    w = World(spec({"a": {}}))
    w.ready()
    w.place("a")
    w.accepted("a")
    (failed,) = w.finished("a", "cancelled")
    assert isinstance(failed, StageFailed) and failed.failure_class == "preempted"


# ---- retry from failure --------------------------------------------------------------------------------------------


def test_retry_request_reruns_failed_and_skipped_stages_and_keeps_succeeded_ones() -> None:
    w = World(spec({"a": {}, "b": {"needs": ["a"]}, "c": {"needs": ["b"]}, "d": {"needs": ["a"]}}))
    w.ready()
    w.run("a", outputs={"dataset": "/data/a.parquet"})
    w.ready()
    w.run("d")
    w.run("b", "failed", failure_class="user")
    w.decide()
    assert w.s.status == "failed"
    assert retry_request(w.s) is not None
    request = retry_request(w.s)
    assert request is not None and request.stages == ("b", "c")
    w.append(request)
    assert w.s.status == "pending" and w.s.retries == 1
    assert retry_request(w.s) is None  # only an ended, unsuccessful pipeline retries
    w.append(request)  # a duplicate request changes nothing
    assert w.s.retries == 1
    decisions = w.decide()
    (ready,) = [d for d in decisions if isinstance(d, ReadyStage)]
    assert (ready.stage, ready.attempt_number) == ("b", 2)
    assert w.stage("a").status == "succeeded" and len(w.stage("a").attempts) == 1
    w.run("b")
    assert w.ready() == ["c"]
    command = run_command(w.s, "c", msgspec.structs.replace(w.attempt("b"), id="x"), now=w.now, lease_s=30)
    assert command.inputs == {"a": {"dataset": "/data/a.parquet"}, "b": {}}
    w.run("c")
    w.decide()
    assert w.s.status == "succeeded"


def test_retry_reruns_an_always_cleanup_downstream_of_the_retried_stage() -> None:
    w = World(spec({"a": {}, "b": {"needs": ["a"]}, "cleanup": {"needs": ["b"], "when": "always"}, "x": {}}))
    w.ready()
    w.run("x")
    w.run("a", "failed", failure_class="user")
    w.ready()
    w.run("cleanup")
    w.decide()
    assert w.s.status == "failed"
    w.retry()
    assert w.statuses() == {"a": "pending", "b": "pending", "cleanup": "pending", "x": "succeeded"}
    assert w.ready() == ["a"]


def test_retry_resets_the_retry_budget() -> None:
    w = World(spec({"a": {"retry": {"max_attempts": 1}}}))
    w.ready()
    w.run("a", "failed", failure_class="infra")
    w.decide()
    assert w.s.status == "failed"
    w.retry()
    w.ready()
    w.run("a", "failed", failure_class="infra")
    w.decide()
    assert w.s.status == "failed" and len(w.stage("a").attempts) == 2


def test_retry_after_cancel_reruns_the_cancelled_stages() -> None:
    w = World(spec({"a": {}, "b": {"needs": ["a"]}}))
    w.ready()
    w.run("a")
    w.cancel()
    w.decide()
    assert w.s.status == "cancelled"
    w.retry()
    assert w.ready() == ["b"]
    assert not w.s.cancel_requested


# ---- reports: fencing, duplicates, stale --------------------------------------------------------------------------


def test_reports_of_unknown_pipeline_stage_attempt_or_agent_are_rejected() -> None:
    w = World(spec({"a": {}}))
    w.ready()
    attempt = w.place("a")
    base = w._base("a", None, None)
    finished = AttemptFinishedReport(**base, outcome="succeeded")
    assert isinstance(admit_report(None, finished)[0], ReportRejected)
    (unknown_stage,) = admit_report(w.s, msgspec.structs.replace(finished, stage="zz"))
    assert isinstance(unknown_stage, ReportRejected) and unknown_stage.reason == "unknown stage 'zz'"
    (unknown_attempt,) = admit_report(w.s, msgspec.structs.replace(finished, attempt="nope"))
    assert isinstance(unknown_attempt, ReportRejected)
    (wrong_agent,) = admit_report(w.s, msgspec.structs.replace(finished, agent="a2"))
    assert isinstance(wrong_agent, ReportRejected) and f"attempt {attempt} was placed on agent a1" in wrong_agent.reason
    before = w.s
    w.append(unknown_stage, wrong_agent)
    assert w.s.stages == before.stages  # rejections are audited, never applied
    (odd,) = admit_report(w.s, msgspec.structs.replace(finished, outcome="exploded"))
    assert isinstance(odd, ReportRejected)


def test_reports_of_a_lost_attempt_are_rejected_after_the_stage_moved_on() -> None:
    w = World(spec({"a": {"retry": NO_JITTER}}), lease_s=30)
    w.ready()
    zombie = w.place("a")
    w.accepted("a")
    w.advance(31)
    w.decide()
    w.advance(10)
    w.ready()
    w.place("a")
    for report in (w.started, w.accepted):
        (rejected,) = report("a", attempt=zombie, agent="a1")
        assert isinstance(rejected, ReportRejected) and "stale attempt 1" in rejected.reason
    (rejected,) = w.finished("a", attempt=zombie, agent="a1")
    assert isinstance(rejected, ReportRejected)
    assert w.attempt("a").status == "placed"


def test_duplicate_reports_change_nothing() -> None:
    w = World(spec({"a": {}}))
    w.ready()
    w.place("a")
    assert len(w.accepted("a")) == 1
    assert w.accepted("a") == []
    assert len(w.started("a")) == 1
    assert w.started("a") == [] and w.accepted("a") == []
    assert len(w.checkpoint("a", 5, "/c/5")) == 1
    assert w.checkpoint("a", 5, "/c/5") == []
    assert len(w.finished("a")) == 1
    assert w.finished("a") == []
    (rejected,) = w.finished("a", "failed", failure_class="infra")
    assert isinstance(rejected, ReportRejected) and "already ended" in rejected.reason


def test_unknown_failure_class_is_recorded_as_unknown() -> None:
    w = World(spec({"a": {}}))
    w.ready()
    w.place("a")
    (failed,) = w.finished("a", "failed", failure_class="gremlins", exit_code=3)
    assert isinstance(failed, StageFailed) and failed.failure_class == "unknown" and failed.reason == "exit code 3"


# ---- the fold itself ------------------------------------------------------------------------------------------------


def test_fold_must_start_with_a_submission() -> None:
    with pytest.raises(FoldError):
        evolve(None, PipelineSucceeded(pipeline_id="p1"))
    with pytest.raises(FoldError):
        fold([])


def test_duplicate_envelopes_and_bare_duplicates_change_nothing() -> None:
    w = World(spec({"a": {"retry": NO_JITTER}, "b": {"needs": ["a"]}}))
    w.ready()
    w.run("a", "failed", failure_class="infra")
    w.decide()
    w.advance(10)
    w.ready()
    w.run("a")
    w.ready()
    w.run("b")
    w.decide()
    final = w.s
    for envelope in w.log:
        assert evolve(final, envelope) == final
    # Bare events (no version to dedupe by) are idempotent by identity.
    for envelope in w.log[1:]:
        assert evolve(final, envelope.event) == final, envelope.event
    assert fold(w.log) == final


def test_events_for_unknown_stages_or_attempts_or_other_pipelines_change_nothing() -> None:
    w = World(spec({"a": {}}))
    w.ready()
    w.place("a")
    s = w.s
    for event in (
        StageSucceeded(pipeline_id="p1", stage="zz", attempt="x"),
        StageSucceeded(pipeline_id="p1", stage="a", attempt="not-current"),
        StageSucceeded(pipeline_id="other", stage="a", attempt=w.attempt("a").id),
        StageSkipped(pipeline_id="p1", stage="a", reason="running stages are not skipped"),
        StageRetryScheduled(pipeline_id="p1", stage="a", attempt="x", next_attempt_number=9, not_before=T0),
        AgentLost(agent="a1", reason="not a pipeline event"),
        TokenCreated(token_id="t", name="n", role="admin"),
    ):
        assert evolve(s, event) == s


def test_snapshot_round_trips_and_tail_fold_equals_full_fold() -> None:
    w = World(spec({"a": {}, "b": {"needs": ["a"]}}))
    w.ready()
    w.run("a", outputs={"path": "/x"})
    w.ready()
    w.run("b")
    w.decide()
    for k in range(1, len(w.log)):
        snapshot = msgspec.json.decode(msgspec.json.encode(fold(w.log[:k])), type=PipelineState)
        assert fold(w.log[k:], snapshot) == w.s
        assert fold(w.log, snapshot) == w.s  # an overlapping tail is deduplicated by version


def test_times_come_from_envelopes() -> None:
    w = World(spec({"a": {}}))
    w.ready()
    w.advance(5)
    w.place("a")
    w.advance(5)
    w.started("a")
    w.advance(5)
    w.finished("a")
    w.decide()
    attempt = w.attempt("a")
    assert (attempt.placed_at, attempt.started_at, attempt.finished_at) == (
        T0 + timedelta(seconds=5),
        T0 + timedelta(seconds=10),
        T0 + timedelta(seconds=15),
    )
    assert w.s.created_at == T0 and w.s.finished_at == T0 + timedelta(seconds=15)


def test_pending_event_records_only_a_changed_placement_reason() -> None:
    w = World(spec({"a": {}}))
    w.ready()
    why = Unplaceable(pipeline_id="p1", stage="a", reason="no agent is connected")
    event = pending_event(w.s, why)
    assert event is not None
    w.append(event)
    assert pending_event(w.s, why) is None
    assert w.stage("a").pending_reason == "no agent is connected"
    assert describe_pending(w.s, "a", w.now) == "no agent is connected"


# ---- agents ---------------------------------------------------------------------------------------------------------


def test_agent_fold_and_hello() -> None:
    hello = AgentHello(report_id="r", agent="a1", sent_at=T0, hostname="h", gpus=(GpuInfo(index=0, name="A100"),))
    registered = admit_hello(None, hello)
    assert isinstance(registered, AgentRegistered)
    agent = evolve_agent(None, registered)
    assert isinstance(agent, AgentState) and agent.status == "active"
    assert admit_hello(agent, hello) is None  # nothing changed
    assert admit_hello(agent, msgspec.structs.replace(hello, cpu_slots=8)) is not None
    drained = evolve_agent(agent, AgentDrainRequested(agent="a1"))
    assert drained is not None and drained.status == "draining"
    lost = evolve_agent(drained, AgentLost(agent="a1", reason="no heartbeat"))
    assert lost is not None and lost.status == "lost"
    assert admit_hello(lost, hello) is not None  # back from the dead: registers again
    gone = evolve_agent(lost, AgentDeregistered(agent="a1"))
    assert gone is not None and gone.status == "gone"
    assert evolve_agent(None, AgentLost(agent="a1", reason="x")) is None


def test_heartbeat_renews_current_attempts_and_cancels_zombies() -> None:
    w = World(spec({"a": {"retry": NO_JITTER}, "b": {}}), lease_s=30)
    w.ready()
    zombie = w.place("a")
    current_b = w.place("b")
    w.accepted("a")
    w.accepted("b")
    w.advance(31)
    w.decide(leases={current_b: w.now + timedelta(seconds=30)})
    heartbeat = AgentHeartbeat(report_id="h", agent="a1", sent_at=w.now, running_attempts=(zombie, current_b, "??"))
    renewals, cancels = admit_heartbeat(heartbeat, attempts_by_id([w.s]), now=w.now, lease_s=30)
    assert renewals == {current_b: w.now + timedelta(seconds=30)}
    assert [c.attempt for c in cancels] == [zombie]
