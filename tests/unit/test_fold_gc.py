"""Unit: the fold's states stay out of the cyclic garbage collector.

A start-up fold makes a new state per event (bench R1: a million of them); while they were tracked,
gen-2 collections over the growing world took about a quarter of the fold's time. `PipelineState`,
`StageState` and `AttemptState` are declared `gc=False`, which is safe because frozen states are built
bottom-up from values that never point back at them (no cycles); this test keeps it that way.
"""

from __future__ import annotations

import gc
from pathlib import Path

from verlyard_scheduler.fold import AttemptState, PipelineState, StageState, fold
from verlyard_shared import codec

LOGS = Path(__file__).resolve().parents[1] / "fixtures" / "event_logs"


def test_folded_states_are_not_tracked_by_the_gc() -> None:
    for path in sorted(LOGS.glob("*.jsonl")):
        state = fold([codec.decode_envelope(line) for line in path.read_text().splitlines() if line.strip()])
        assert not gc.is_tracked(state), path.name
        # The stage map then holds only untracked values, so CPython leaves the dict untracked too.
        assert not gc.is_tracked(state.stages), path.name
        for stage in state.stages.values():
            assert not gc.is_tracked(stage), path.name
            assert all(not gc.is_tracked(attempt) for attempt in stage.attempts), path.name


def test_the_state_types_are_declared_without_gc() -> None:
    for cls in (PipelineState, StageState, AttemptState):
        assert cls.__struct_config__.gc is False, cls.__name__
