"""Unit: the API's read model agrees with the scheduler's fold on every recorded log and on driven scenarios.

The projector reimplements the fold's rules (the services may not import each other); this test is
what keeps the two from drifting apart.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.pipeline_world import World, spec
from verlyard_api.projector import evolve
from verlyard_api.views import PipelineView
from verlyard_scheduler.fold import PipelineState, fold
from verlyard_shared import codec
from verlyard_shared.envelope import Envelope

LOGS = Path(__file__).resolve().parents[1] / "fixtures" / "event_logs"
RETRY = {"max_attempts": 3, "initial_delay": "10s", "jitter": "full", "retry_on": ["infra", "lost"]}


def project(log: list[Envelope]) -> PipelineView:
    view: PipelineView | None = None
    for envelope in log:
        view = evolve(view, envelope)
    assert view is not None
    return view


def assert_agree(log: list[Envelope]) -> None:
    state: PipelineState = fold(log)
    view = project(log)
    assert view.status == state.status
    assert view.finished_at == state.finished_at and view.created_at == state.created_at
    assert view.retries == state.retries and view.cancel_requested == state.cancel_requested
    assert view.failed_stages == state.failed_stages and view.version == state.version
    assert set(view.stages) == set(state.stages)
    for name, stage in state.stages.items():
        got = view.stages[name]
        assert (got.status, got.outputs, got.finished_at, got.not_before) == (
            stage.status,
            stage.outputs,
            stage.finished_at,
            stage.not_before,
        ), name
        assert (got.checkpoint_step, got.checkpoint_path) == (stage.checkpoint_step, stage.checkpoint_path)
        if stage.pending_reason is not None:
            assert got.pending_reason == stage.pending_reason
        assert [
            (a.id, a.number, a.agent, a.status, a.started_at, a.finished_at, a.exit_code, a.failure_class)
            for a in got.attempts
        ] == [
            (a.id, a.number, a.agent, a.status, a.started_at, a.finished_at, a.exit_code, a.failure_class)
            for a in stage.attempts
        ], name
        assert [a.resumed_from_step for a in got.attempts] == [a.resumed_from_step for a in stage.attempts]


@pytest.mark.parametrize("path", sorted(LOGS.glob("*.jsonl")), ids=lambda p: p.stem)
def test_recorded_logs(path: Path) -> None:
    log = [codec.decode_envelope(line) for line in path.read_text().splitlines() if line.strip()]
    assert_agree(log)
    for cut in range(1, len(log)):  # and at every point along the way
        assert_agree(log[:cut])


def test_failure_backoff_retry_and_cancel() -> None:
    w = World(spec({"a": {"retry": RETRY}, "b": {"needs": ["a"]}, "c": {"needs": ["b"], "when": "always"}}))
    w.ready()
    w.run("a", "failed", failure_class="infra", exit_code=1)
    w.decide()
    w.advance(3600)
    w.ready()
    w.place("a")
    w.accepted("a")
    w.started("a")
    w.checkpoint("a", 5, "/ck/5")
    assert_agree(w.log)
    w.cancel()
    w.decide()
    w.finished("a", "cancelled", failure_class="cancelled", exit_code=None)
    w.decide()
    w.decide()
    assert_agree(w.log)
    assert w.s.terminal
    w.retry()
    w.ready()
    assert_agree(w.log)
