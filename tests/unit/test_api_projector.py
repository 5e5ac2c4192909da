"""Unit: the API's pure projector (event -> read-model view -> row changes) and its verify comparison."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from msgspec.structs import replace

from tests.unit.api_log import PID, T0, Log, placed, run_ok, submitted
from verlyard_api.projector import (
    AttemptRow,
    PipelineRow,
    Projection,
    StageRow,
    diff,
    evolve,
    project_batch,
    retry_targets,
    token_view,
)
from verlyard_api.verify import compare
from verlyard_api.views import PipelineView
from verlyard_shared.events import (
    AttemptAccepted,
    AttemptLost,
    AttemptProgressed,
    AttemptStarted,
    CheckpointSaved,
    PipelineCancelled,
    PipelineCancelRequested,
    PipelineFailed,
    PipelineRetryRequested,
    PipelineSucceeded,
    ReportRejected,
    StageCancelled,
    StageFailed,
    StagePending,
    StageRetryScheduled,
    StageSkipped,
    StageSucceeded,
    TokenCreated,
)

# ---- Given/When/Then over events ------------------------------------------------------------------------


def test_submitted_pipeline_is_pending_with_every_stage_pending_in_spec_order() -> None:
    view = submitted(Log()).view()
    assert view.status == "pending"
    assert view.name == "demo" and view.labels == {"team": "nlp"}
    assert view.submitted_by == "token:t1:alice" and view.idempotency_key == "k1"
    assert list(view.stages) == ["prep", "train", "eval"]
    assert all(s.status == "pending" and s.attempts == () for s in view.stages.values())
    assert view.stages["train"].needs == ("prep",) and view.stages["train"].kind == "noop"
    assert view.created_at == T0 + timedelta(seconds=1) and view.finished_at is None
    assert view.version == 1 and view.submitted_position == 1


def test_a_stream_that_does_not_start_with_submitted_projects_nothing() -> None:
    log = Log()
    envelope = log.add(PipelineSucceeded(pipeline_id=PID))
    assert evolve(None, envelope) is None


def test_placement_makes_the_pipeline_running_and_the_attempt_placed() -> None:
    log = submitted(Log())
    log.add(StagePending(pipeline_id=PID, stage="prep", reason="no agent has a free GPU"))
    assert log.view().stages["prep"].pending_reason == "no agent has a free GPU"
    placed(log, "prep", "a-1", resume_from_step=None, gpus=(0,))
    view = log.view()
    assert view.status == "running"
    stage = view.stages["prep"]
    assert stage.status == "running" and stage.pending_reason is None
    (attempt,) = stage.attempts
    assert attempt.id == "a-1" and attempt.agent == "a1" and attempt.status == "placed" and attempt.gpus == (0,)
    assert attempt.placed_at == T0 + timedelta(seconds=3) and attempt.started_at is None


def test_attempt_lifecycle_sets_times_progress_checkpoint_outputs_and_exit_code() -> None:
    log = submitted(Log())
    placed(log, "prep", "a-1")
    log.add(AttemptAccepted(pipeline_id=PID, stage="prep", attempt="a-1", agent="a1"))
    assert log.view().stages["prep"].attempts[0].status == "accepted"
    started = log.add(AttemptStarted(pipeline_id=PID, stage="prep", attempt="a-1", agent="a1"))
    log.add(AttemptProgressed(pipeline_id=PID, stage="prep", attempt="a-1", step=5, total_steps=10))
    log.add(CheckpointSaved(pipeline_id=PID, stage="prep", attempt="a-1", step=5, path="/ck/5"))
    log.add(CheckpointSaved(pipeline_id=PID, stage="prep", attempt="a-1", step=3, path="/ck/3"))  # older: ignored
    done = log.add(StageSucceeded(pipeline_id=PID, stage="prep", attempt="a-1", outputs={"rows": 10}, exit_code=0))
    stage = log.view().stages["prep"]
    attempt = stage.attempts[0]
    assert attempt.status == "succeeded" and attempt.exit_code == 0
    assert attempt.started_at == started.recorded_at and attempt.finished_at == done.recorded_at
    assert attempt.step == 5 and attempt.total_steps == 10
    assert stage.status == "succeeded" and stage.outputs == {"rows": 10} and stage.finished_at == done.recorded_at
    assert (stage.checkpoint_step, stage.checkpoint_path) == (5, "/ck/5")


def test_failure_then_scheduled_retry_then_second_attempt_resumes() -> None:
    log = submitted(Log())
    placed(log, "prep", "a-1")
    log.add(StageFailed(pipeline_id=PID, stage="prep", attempt="a-1", failure_class="infra", exit_code=137))
    failed = log.view().stages["prep"]
    assert failed.status == "failed" and failed.attempts[0].failure_class == "infra"
    assert failed.attempts[0].exit_code == 137 and failed.reason == "infra"
    not_before = datetime(2026, 1, 1, 14, 0, 0, tzinfo=UTC) + timedelta(hours=1)
    log.add(
        StageRetryScheduled(pipeline_id=PID, stage="prep", attempt="a-1", next_attempt_number=2, not_before=not_before)
    )
    waiting = log.view().stages["prep"]
    assert waiting.status == "pending" and waiting.not_before == not_before
    assert waiting.pending_reason is not None and "backoff" in waiting.pending_reason
    placed(log, "prep", "a-2", number=2, resume_from_step=5)
    stage = log.view().stages["prep"]
    assert [a.id for a in stage.attempts] == ["a-1", "a-2"]
    assert stage.attempts[1].resumed_from_step == 5 and stage.status == "running" and stage.not_before is None


def test_a_stale_attempt_cannot_end_the_stage() -> None:
    log = submitted(Log())
    placed(log, "prep", "a-1")
    log.add(AttemptLost(pipeline_id=PID, stage="prep", attempt="a-1", agent="a1", reason="lease expired"))
    log.add(StageRetryScheduled(pipeline_id=PID, stage="prep", attempt="a-1", next_attempt_number=2, not_before=T0))
    placed(log, "prep", "a-2", number=2)
    before = log.view()
    log.add(StageSucceeded(pipeline_id=PID, stage="prep", attempt="a-1"))  # the zombie reports late
    log.add(ReportRejected(pipeline_id=PID, stage="prep", attempt="a-1", agent="a1", report_type="x", reason="stale"))
    after = log.view()
    assert after.stages == before.stages
    assert after.stages["prep"].attempts[0].status == "lost"
    assert after.stages["prep"].attempts[0].failure_class == "lost"


def test_terminal_events_set_status_and_finished_at_once() -> None:
    log = submitted(Log())
    run_ok(log, "prep", "a-1")
    end = log.add(PipelineFailed(pipeline_id=PID, reason="train failed", failed_stages=("train",)))
    log.add(PipelineSucceeded(pipeline_id=PID))  # after a terminal event: ignored
    view = log.view()
    assert view.status == "failed" and view.finished_at == end.recorded_at
    assert view.reason == "train failed" and view.failed_stages == ("train",)


def test_cancel_request_is_a_flag_until_the_scheduler_cancels() -> None:
    log = submitted(Log())
    placed(log, "prep", "a-1")
    log.add(PipelineCancelRequested(pipeline_id=PID, reason="stop"), actor="token:t1:alice")
    assert log.view().cancel_requested and log.view().status == "running"
    log.add(StageCancelled(pipeline_id=PID, stage="prep", attempt="a-1", reason="stop"))
    log.add(StageCancelled(pipeline_id=PID, stage="train", reason="stop"))
    log.add(StageCancelled(pipeline_id=PID, stage="eval", reason="stop"))
    log.add(PipelineCancelled(pipeline_id=PID, reason="stop"))
    view = log.view()
    assert view.status == "cancelled"
    assert {n: s.status for n, s in view.stages.items()} == {
        "prep": "cancelled",
        "train": "cancelled",
        "eval": "cancelled",
    }
    assert view.stages["prep"].attempts[0].status == "cancelled"


def test_skipped_stage_and_retry_request_resets_failed_and_dependent_stages() -> None:
    log = submitted(Log())
    run_ok(log, "prep", "a-1")
    placed(log, "train", "a-2")
    log.add(StageFailed(pipeline_id=PID, stage="train", attempt="a-2", failure_class="user"))
    log.add(StageSkipped(pipeline_id=PID, stage="eval", reason="train failed"))
    log.add(PipelineFailed(pipeline_id=PID, reason="train failed", failed_stages=("train",)))
    failed = log.view()
    assert failed.stages["eval"].status == "skipped"
    assert retry_targets(failed) == ["train", "eval"]
    assert retry_targets(failed, ["train"]) == ["train", "eval"]
    log.add(PipelineRetryRequested(pipeline_id=PID, stages=("train", "eval")))
    view = log.view()
    assert view.status == "pending" and view.finished_at is None and view.retries == 1
    assert {n: s.status for n, s in view.stages.items()} == {"prep": "succeeded", "train": "pending", "eval": "pending"}
    assert len(view.stages["train"].attempts) == 1  # the history stays
    placed(log, "train", "a-3", number=2)
    assert log.view().status == "running"


def test_duplicate_envelopes_change_nothing() -> None:
    log = submitted(Log())
    run_ok(log, "prep", "a-1")
    view = log.view()
    for envelope in log.envelopes:
        assert evolve(view, envelope) == view


def test_other_pipelines_events_and_foreign_streams_are_ignored() -> None:
    log = submitted(Log())
    log.add(StageSucceeded(pipeline_id="other", stage="prep", attempt="x"))
    assert log.view().stages["prep"].status == "pending"


# ---- batches, diffs and verify ---------------------------------------------------------------------------


def test_incremental_batches_equal_a_full_replay() -> None:
    log = submitted(Log())
    run_ok(log, "prep", "a-1")
    placed(log, "train", "a-2")
    log.add(TokenCreated(token_id="t9", name="ci", role="member"), stream="token-t9", actor="token:t1:admin")
    log.add(AttemptProgressed(pipeline_id=PID, stage="train", attempt="a-2", step=1))
    other = Log("p2")
    other._positions = itertools.count(100)
    submitted(other)
    envelopes = log.envelopes + other.envelopes
    full = Projection()
    for envelope in envelopes:
        full.apply(envelope)
    stored: dict[str, PipelineView] = {}
    tokens: dict[str, Any] = {}
    for start in range(0, len(envelopes), 3):  # batches of three, each applied onto what is "stored"
        views, created = project_batch(stored, envelopes[start : start + 3])
        stored.update(views)
        tokens.update({t.id: t for t in created})
    assert stored == full.pipelines
    assert tokens == full.tokens and tokens["t9"].role == "member" and tokens["t9"].created_by == "token:t1:admin"


def test_diff_writes_only_what_changed() -> None:
    log = submitted(Log())
    first = log.view()
    changes = diff(None, first)
    assert sum(isinstance(c, PipelineRow) for c in changes) == 1
    assert [c.stage.name for c in changes if isinstance(c, StageRow)] == ["prep", "train", "eval"]
    assert [c.ordinal for c in changes if isinstance(c, StageRow)] == [0, 1, 2]
    placed(log, "train", "a-1")
    log.add(AttemptProgressed(pipeline_id=PID, stage="train", attempt="a-1", step=3))
    before = evolve(first, log.envelopes[1])
    assert before is not None
    after = evolve(before, log.envelopes[2])
    assert after is not None
    changes = diff(before, after)
    assert [type(c).__name__ for c in changes] == ["PipelineRow", "AttemptRow"]
    attempt_row = changes[1]
    assert isinstance(attempt_row, AttemptRow) and attempt_row.attempt.step == 3 and attempt_row.ordinal == 0


def test_compare_names_the_pipeline_field_and_both_values() -> None:
    log = submitted(Log())
    run_ok(log, "prep", "a-1")
    expected = Projection()
    for envelope in log.envelopes:
        expected.apply(envelope)
    assert compare(expected, expected) == []
    view = expected.pipelines[PID]
    broken_stage = replace(view.stages["prep"], status="failed")
    broken_attempt = replace(
        view.stages["prep"], attempts=(replace(view.stages["prep"].attempts[0], agent="elsewhere"),)
    )
    found = Projection(pipelines={PID: replace(view, status="cancelled", stages={**view.stages, "prep": broken_stage})})
    diffs = compare(expected, found)
    assert [(d.id, d.field, d.expected, d.found) for d in diffs] == [
        (PID, "status", "running", "cancelled"),
        (PID, "stages.prep.status", "succeeded", "failed"),
    ]
    found = Projection(pipelines={PID: replace(view, stages={**view.stages, "prep": broken_attempt})})
    assert [(d.field, d.expected, d.found) for d in compare(expected, found)] == [
        ("stages.prep.attempts[0].agent", "a1", "elsewhere")
    ]
    missing = compare(expected, Projection())
    assert len(missing) == 1 and missing[0].field == "" and missing[0].found is None


def test_token_view_only_for_token_created() -> None:
    log = Log()
    envelope = log.add(TokenCreated(token_id="t1", name="admin", role="admin"), stream="token-t1", actor="system")
    token = token_view(envelope)
    assert token is not None and (token.id, token.name, token.role, token.created_by) == (
        "t1",
        "admin",
        "admin",
        "system",
    )
    assert token_view(log.add(PipelineSucceeded(pipeline_id=PID))) is None
