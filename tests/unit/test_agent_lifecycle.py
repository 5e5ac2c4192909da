"""Unit: what the agent does with a command, given its local record of the attempt (idempotency)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from verlyard_agent.layout import attempt_paths, default_data_dir, record_file
from verlyard_agent.lifecycle import AttemptRecord, RecordState, on_cancel, on_run_stage
from verlyard_shared.commands import CancelAttempt, RunStage
from verlyard_shared.spec import StageSpec

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def run(agent: str = "a1") -> RunStage:
    return RunStage(
        command_id="att-1",
        agent=agent,
        issued_at=NOW,
        pipeline_id="p1",
        pipeline_name="demo",
        stage="train",
        attempt="att-1",
        attempt_number=1,
        spec=StageSpec(kind="noop"),
    )


def cancel(agent: str = "a1") -> CancelAttempt:
    return CancelAttempt(command_id="c", agent=agent, issued_at=NOW, pipeline_id="p1", stage="train", attempt="att-1")


def record(state: RecordState) -> AttemptRecord:
    return AttemptRecord(attempt="att-1", pipeline_id="p1", stage="train", kind="noop", state=state, updated_at=NOW)


@pytest.mark.parametrize(
    ("known", "draining", "expected"),
    [
        (None, False, "accept"),
        (None, True, "refuse"),
        ("accepted", False, "already_running"),
        ("running", True, "already_running"),
        ("finished", False, "already_finished"),
    ],
)
def test_run_stage_is_accepted_once(known: RecordState | None, draining: bool, expected: str):
    rec = record(known) if known else None
    assert on_run_stage(run(), me="a1", known=rec, draining=draining) == expected


def test_commands_for_another_agent_are_refused():
    assert on_run_stage(run("a2"), me="a1", known=None, draining=False) == "wrong_agent"
    assert on_cancel(cancel("a2"), me="a1", known=None) == "wrong_agent"


def test_cancel_decisions():
    assert on_cancel(cancel(), me="a1", known=None) == "tombstone"
    assert on_cancel(cancel(), me="a1", known=record("running")) == "stop"
    assert on_cancel(cancel(), me="a1", known=record("accepted")) == "stop"
    assert on_cancel(cancel(), me="a1", known=record("finished")) == "already_finished"


def test_layout_keeps_every_attempt_in_its_own_folder_and_refuses_unsafe_names():
    paths = attempt_paths(Path("/d"), pipeline_id="p1", stage="train", attempt="a-1")
    assert paths.work_dir == Path("/d/pipelines/p1/train/attempts/a-1")
    assert paths.stage_dir == Path("/d/pipelines/p1/train") and paths.log_file.name == "attempt.log"
    assert default_data_dir(Path("/h"), "gpu-1") == Path("/h/agent/gpu-1")
    for bad in ("..", "a/b", "", "x.y"):
        with pytest.raises(ValueError, match="not a safe name"):
            attempt_paths(Path("/d"), pipeline_id="p1", stage=bad, attempt="a")
    with pytest.raises(ValueError, match="not a safe name"):
        record_file(Path("/d"), "../../etc/passwd")
