"""Testing: a pipeline stream built event by event for the API projector's Given/When/Then tests.

Positions, versions and times move only when a test adds an event (no clocks, no ids from outside).
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from verlyard_api.projector import evolve
from verlyard_api.views import PipelineView
from verlyard_shared.envelope import Envelope
from verlyard_shared.events import (
    AnyEvent,
    AttemptAccepted,
    AttemptStarted,
    PipelineSubmitted,
    StagePlaced,
    StageSucceeded,
)
from verlyard_shared.validation import validate_pipeline

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
PID = "p1"
SPEC = validate_pipeline(
    {
        "name": "demo",
        "labels": {"team": "nlp"},
        "stages": {
            "prep": {"kind": "noop"},
            "train": {"kind": "noop", "needs": ["prep"]},
            "eval": {"kind": "noop", "needs": ["train"]},
        },
    }
)


class Log:
    """A pipeline stream built event by event, with positions, versions and times that only tests move."""

    def __init__(self, pipeline_id: str = PID) -> None:
        self.pipeline_id = pipeline_id
        self.envelopes: list[Envelope] = []
        self._positions = itertools.count(1)

    def add(self, event: AnyEvent, *, actor: str = "scheduler", stream: str | None = None) -> Envelope:
        position = next(self._positions)
        envelope = Envelope(
            position=position,
            event_id=f"e{position}",
            stream_id=stream or f"pipeline-{self.pipeline_id}",
            version=sum(1 for e in self.envelopes if e.stream_id == (stream or f"pipeline-{self.pipeline_id}")) + 1,
            recorded_at=T0 + timedelta(seconds=position),
            actor=actor,
            correlation_id=f"corr-{position}",
            event=event,
        )
        self.envelopes.append(envelope)
        return envelope

    def view(self) -> PipelineView:
        view: PipelineView | None = None
        for envelope in self.envelopes:
            if envelope.stream_id == f"pipeline-{self.pipeline_id}":
                view = evolve(view, envelope)
        assert view is not None
        return view


def submitted(log: Log) -> Log:
    log.add(PipelineSubmitted(pipeline_id=log.pipeline_id, spec=SPEC, idempotency_key="k1"), actor="token:t1:alice")
    return log


def placed(log: Log, stage: str, attempt: str, number: int = 1, **kw: Any) -> None:
    log.add(
        StagePlaced(pipeline_id=log.pipeline_id, stage=stage, attempt=attempt, attempt_number=number, agent="a1", **kw)
    )


def run_ok(log: Log, stage: str, attempt: str, outputs: dict[str, Any] | None = None) -> None:
    placed(log, stage, attempt)
    log.add(AttemptAccepted(pipeline_id=log.pipeline_id, stage=stage, attempt=attempt, agent="a1"))
    log.add(AttemptStarted(pipeline_id=log.pipeline_id, stage=stage, attempt=attempt, agent="a1", pid=42))
    log.add(StageSucceeded(pipeline_id=log.pipeline_id, stage=stage, attempt=attempt, outputs=outputs or {}))
