"""Unit: recorded pipeline event logs (tests/fixtures/event_logs) re-fold to their recorded outcome.

Each `<name>.jsonl` holds one envelope per line; `<name>.expected.json` the folded summary. The logs
are what the scheduler core produced for the scenarios below; a change in the fold, the decisions or
the event schema shows up here as a diff. Regenerate deliberately with
`.venv/bin/python -m tests.unit.test_recorded_logs`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from verlyard_scheduler.fold import PipelineState, fold
from verlyard_shared import codec
from verlyard_shared.envelope import Envelope
from verlyard_shared.events import event_type

from .pipeline_world import World, spec

LOGS = Path(__file__).resolve().parents[1] / "fixtures" / "event_logs"
RETRY = {"max_attempts": 3, "initial_delay": "10s", "jitter": "full", "retry_on": ["infra", "lost"]}


def diamond_with_retry_and_lost_attempt() -> World:
    w = World(
        spec(
            {"a": {}, "b": {"needs": ["a"], "retry": RETRY}, "c": {"needs": ["a"], "retry": RETRY},
             "d": {"needs": ["b", "c"]}},
            name="diamond",
        ),
        pipeline_id="0190a000-0000-7000-8000-000000000001",
    )  # fmt: skip
    w.ready()
    w.run("a", outputs={"dataset": "/data/a"})
    w.ready()
    w.place("b")
    w.place("c", agent="a2")
    w.accepted("b")
    w.accepted("c")
    w.started("c")
    w.finished("b", "failed", failure_class="infra", exit_code=137)
    w.advance(31)
    w.decide()  # c's lease expired: lost
    w.advance(20)
    w.ready()
    w.run("b")
    w.run("c")
    w.finished("c", attempt=w.stage("c").attempts[0].id, agent="a2")  # the zombie's late report: rejected
    w.ready()
    w.run("d")
    w.decide()
    return w


def failure_then_retry_from_failure() -> World:
    w = World(
        spec(
            {"prep": {"kind": "preprocess", "with": {"dataset": "d"}},
             "train": {"kind": "train", "needs": ["prep"], "with": {"model": "m"}},
             "eval": {"kind": "evaluate", "needs": ["train"]},
             "cleanup": {"kind": "cleanup", "needs": ["eval"], "when": "always"}},
            name="sft",
        ),
        pipeline_id="0190a000-0000-7000-8000-000000000002",
    )  # fmt: skip
    w.ready()
    w.run("prep")
    w.ready()
    w.place("train")
    w.accepted("train")
    w.started("train")
    w.checkpoint("train", 50, "/ckpt/global_step_50")
    w.finished("train", "failed", failure_class="oom", exit_code=1)
    w.ready()
    w.run("cleanup")
    w.decide()
    w.retry()
    w.ready()
    w.run("train", outputs={"checkpoint": "/ckpt/global_step_100"})
    w.ready()
    w.run("eval")
    w.ready()
    w.run("cleanup")
    w.decide()
    return w


def cancelled_mid_run() -> World:
    w = World(
        spec({"a": {}, "b": {"needs": ["a"]}, "c": {}}, name="cancel-me"),
        pipeline_id="0190a000-0000-7000-8000-000000000003",
    )
    w.ready()
    w.place("a")
    w.place("c")
    w.accepted("a")
    w.accepted("c")
    w.started("a")
    w.cancel("user said stop")
    w.decide()
    w.finished("c")  # finished before the cancel reached it
    w.finished("a", "cancelled")
    w.decide()
    return w


SCENARIOS: dict[str, Callable[[], World]] = {
    "diamond-retry-lost": diamond_with_retry_and_lost_attempt,
    "failure-then-retry": failure_then_retry_from_failure,
    "cancelled-mid-run": cancelled_mid_run,
}


def summary(state: PipelineState) -> dict[str, Any]:
    return {
        "status": state.status,
        "reason": state.reason,
        "retries": state.retries,
        "stages": {
            name: {"status": s.status, "reason": s.reason, "attempts": [a.status for a in s.attempts]}
            for name, s in state.stages.items()
        },
    }


def read_log(name: str) -> list[Envelope]:
    lines = (LOGS / f"{name}.jsonl").read_text().splitlines()
    return [codec.decode_envelope(line) for line in lines if line.strip()]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_recorded_log_refolds_to_its_recorded_outcome(name: str) -> None:
    log = read_log(name)
    expected = json.loads((LOGS / f"{name}.expected.json").read_text())
    assert summary(fold(log)) == expected


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_the_core_still_produces_the_recorded_history(name: str) -> None:
    recorded = [event_type(e.event) for e in read_log(name)]
    assert SCENARIOS[name]().types() == recorded


def write_fixtures() -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    for name, scenario in SCENARIOS.items():
        world = scenario()
        (LOGS / f"{name}.jsonl").write_bytes(b"".join(codec.encode(e) + b"\n" for e in world.log))
        (LOGS / f"{name}.expected.json").write_text(json.dumps(summary(world.s), indent=2) + "\n")


if __name__ == "__main__":
    write_fixtures()
