"""Testing: a pipeline's event log driven by the pure scheduler core, for Given/When/Then tests.

No clocks, no ids from the environment: time moves only when a test calls `advance`, and ids are
counters. Reports go through `admit_report` (fencing), decisions through `decide`, and every event
is appended in an envelope and folded, exactly as the service does.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from verlyard_scheduler.decide import Decision, SendCommand, cancel_request, decide, placed_event, retry_request
from verlyard_scheduler.fold import AttemptState, PipelineState, StageState, evolve
from verlyard_scheduler.ingest import admit_report
from verlyard_scheduler.placement import Placement, ReadyStage
from verlyard_shared.envelope import Envelope
from verlyard_shared.events import AnyEvent, PipelineSubmitted, StagePlaced, event_type
from verlyard_shared.reports import (
    AttemptAcceptedReport,
    AttemptFinishedReport,
    AttemptProgressReport,
    AttemptStartedReport,
    CheckpointReport,
)
from verlyard_shared.spec import PipelineSpec
from verlyard_shared.validation import validate_pipeline

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)

AnyAttemptReport = (
    AttemptAcceptedReport | AttemptStartedReport | AttemptProgressReport | CheckpointReport | AttemptFinishedReport
)


def spec(stages: dict[str, dict[str, Any]], *, name: str = "p", **top: Any) -> PipelineSpec:
    """A validated spec; stages default to `kind: noop`."""
    doc: dict[str, Any] = {"name": name, **top, "stages": {n: {"kind": "noop", **body} for n, body in stages.items()}}
    return validate_pipeline(doc)


class World:
    def __init__(self, pipeline: PipelineSpec, *, pipeline_id: str = "p1", now: datetime = T0, lease_s: float = 30.0):
        self.pipeline_id = pipeline_id
        self.now = now
        self.lease_s = lease_s
        self.log: list[Envelope] = []
        self.state: PipelineState | None = None
        self.decisions: list[Decision] = []
        self._ids = itertools.count(1)
        self.append(PipelineSubmitted(pipeline_id=pipeline_id, spec=pipeline))

    # -- the log -------------------------------------------------------------------------------------------

    @property
    def s(self) -> PipelineState:
        assert self.state is not None
        return self.state

    def append(self, *events: AnyEvent) -> None:
        for event in events:
            n = len(self.log) + 1
            envelope = Envelope(
                position=n,
                event_id=f"e{n}",
                stream_id=f"pipeline-{self.pipeline_id}",
                version=n,
                recorded_at=self.now,
                actor="test",
                correlation_id="c",
                event=event,
            )
            self.log.append(envelope)
            self.state = evolve(self.state, envelope)

    def cancel(self, reason: str = "cancelled by user") -> None:
        request = cancel_request(self.s, reason)
        assert request is not None, "nothing to cancel"
        self.append(request)

    def retry(self) -> None:
        request = retry_request(self.s)
        assert request is not None, "nothing to retry"
        self.append(request)

    def types(self) -> list[str]:
        return [event_type(e.event) for e in self.log]

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    # -- the scheduler -------------------------------------------------------------------------------------

    def decide(self, **kwargs: Any) -> list[Decision]:
        kwargs.setdefault("lease_s", self.lease_s)
        self.decisions = decide(self.s, self.now, **kwargs)
        self.append(*[d for d in self.decisions if not isinstance(d, SendCommand | ReadyStage)])
        return self.decisions

    def ready(self, **kwargs: Any) -> list[str]:
        """Decide, and name the stages ready for placement."""
        return [d.stage for d in self.decide(**kwargs) if isinstance(d, ReadyStage)]

    def commands(self) -> list[SendCommand]:
        return [d for d in self.decisions if isinstance(d, SendCommand)]

    def place(
        self, stage: str, *, agent: str = "a1", gpus: tuple[int, ...] = (), accept_timeout_s: float = 60.0
    ) -> str:
        attempt_id = f"{stage}-{next(self._ids)}"
        placement = Placement(
            pipeline_id=self.pipeline_id,
            stage=stage,
            attempt_number=len(self.stage(stage).attempts) + 1,
            agent=agent,
            gpus=gpus,
            cpu_slots=0 if gpus else 1,
        )
        event: StagePlaced = placed_event(
            self.s, placement, attempt_id=attempt_id, now=self.now, accept_timeout_s=accept_timeout_s
        )
        self.append(event)
        assert self.attempt(stage).id == attempt_id, f"{stage} was not placeable: {self.stage(stage).status}"
        return attempt_id

    # -- the agent -----------------------------------------------------------------------------------------

    def report(self, report: AnyAttemptReport) -> list[AnyEvent]:
        events = admit_report(self.state, report)
        self.append(*events)
        return events

    def _base(self, stage: str, attempt: str | None, agent: str | None) -> dict[str, Any]:
        current = self.attempt(stage)
        return {
            "report_id": f"r{next(self._ids)}",
            "agent": agent or current.agent,
            "sent_at": self.now,
            "pipeline_id": self.pipeline_id,
            "stage": stage,
            "attempt": attempt or current.id,
        }

    def accepted(self, stage: str, *, attempt: str | None = None, agent: str | None = None) -> list[AnyEvent]:
        return self.report(AttemptAcceptedReport(**self._base(stage, attempt, agent)))

    def started(self, stage: str, *, attempt: str | None = None, agent: str | None = None) -> list[AnyEvent]:
        return self.report(AttemptStartedReport(**self._base(stage, attempt, agent)))

    def checkpoint(self, stage: str, step: int, path: str, *, attempt: str | None = None) -> list[AnyEvent]:
        return self.report(CheckpointReport(**self._base(stage, attempt, None), step=step, path=path))

    def finished(
        self,
        stage: str,
        outcome: str = "succeeded",
        *,
        failure_class: str | None = None,
        attempt: str | None = None,
        agent: str | None = None,
        outputs: dict[str, Any] | None = None,
        exit_code: int | None = 0,
    ) -> list[AnyEvent]:
        return self.report(
            AttemptFinishedReport(
                **self._base(stage, attempt, agent),
                outcome=outcome,
                failure_class=failure_class,
                outputs=outputs or {},
                exit_code=exit_code,
            )
        )

    def run(self, stage: str, outcome: str = "succeeded", **kwargs: Any) -> str:
        """Place, accept, start and finish one attempt of `stage`."""
        attempt = self.place(stage)
        self.accepted(stage)
        self.started(stage)
        self.finished(stage, outcome, **kwargs)
        return attempt

    # -- reading -------------------------------------------------------------------------------------------

    def stage(self, name: str) -> StageState:
        return self.s.stages[name]

    def attempt(self, stage: str) -> AttemptState:
        current = self.stage(stage).current
        assert current is not None, f"{stage} has no attempt"
        return current

    def statuses(self) -> dict[str, str]:
        return {name: st.status for name, st in self.s.stages.items()}
