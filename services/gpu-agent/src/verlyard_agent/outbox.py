"""Adapter: reports and telemetry on their way out. Everything is appended to a local journal first
(journal.py), never sent to NATS directly, so an attempt never waits on the bus.

`AttemptTelemetry` batches one attempt's log lines (every ~100 ms or 200 lines) and metric points
(every ~5 ms) into LogBatch / MetricBatch messages on `vy.log.<pipeline>.<stage>` and
`vy.met.<pipeline>.<stage>`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

from verlyard_agent.batching import Batcher
from verlyard_agent.journal import Journal
from verlyard_shared import codec, subjects
from verlyard_shared.ids import new_id
from verlyard_shared.reports import AttemptFinishedReport, CheckpointReport, Report
from verlyard_shared.telemetry import LogBatch, LogLine, MetricBatch, MetricPoint

LOG_FLUSH_S = 0.1
LOG_MAX_LINES = 200
METRIC_FLUSH_S = 0.005
"""Short: a step's points arrive together (one record), so this only gathers that record's keys into
one batch; a long wait here would sit inside the live-metric latency (bench L1, p50 <= 100 ms)."""
METRIC_MAX_POINTS = 500


def report_kind(report: Report) -> str:
    """`rpt.accepted` -> `accepted`: the last token of the report subject."""
    tag = type(report).__struct_config__.tag
    assert isinstance(tag, str)
    return tag.rsplit(".", 1)[-1]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Outbox:
    """Where reports and telemetry go: two journals (reports fsynced, telemetry only flushed)."""

    def __init__(self, agent_id: str, *, reports: Journal, telemetry: Journal) -> None:
        self.agent_id = agent_id
        self.reports = reports
        self.telemetry = telemetry

    def report(self, report: Report) -> None:
        subject = subjects.report_subject(self.agent_id, report_kind(report))
        # Only an attempt's end and its checkpoints must survive a power loss before NATS has them:
        # losing accepted/started/progress costs nothing the restarted agent does not report anyway.
        durable = isinstance(report, AttemptFinishedReport | CheckpointReport)
        self.reports.append(subject, report.report_id, codec.encode(report), durable=durable)

    def publish_telemetry(self, subject: str, msg_id: str, data: bytes) -> None:
        self.telemetry.append(subject, msg_id, data)


class AttemptTelemetry:
    """Batches one attempt's log lines and metric points into the telemetry journal."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        pipeline_id: str,
        stage: str,
        attempt: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._outbox = outbox
        self._pipeline_id = pipeline_id
        self._stage = stage
        self._attempt = attempt
        self._clock = clock
        self._log_subject = subjects.log_subject(pipeline_id, stage)
        self._metric_subject = subjects.metric_subject(pipeline_id, stage)
        self._lines: Batcher[LogLine] = Batcher(max_items=LOG_MAX_LINES, max_age_s=LOG_FLUSH_S)
        self._points: Batcher[MetricPoint] = Batcher(max_items=METRIC_MAX_POINTS, max_age_s=METRIC_FLUSH_S)
        self._log_timer: asyncio.TimerHandle | None = None
        self._metric_timer: asyncio.TimerHandle | None = None

    def line(self, offset: int, stream: str, text: str) -> None:
        was_empty = len(self._lines) == 0
        if self._lines.add(LogLine(offset=offset, stream=stream, text=text), self._clock(), size=len(text) + 16):
            self.flush_lines()
        elif was_empty:
            self._log_timer = asyncio.get_running_loop().call_later(LOG_FLUSH_S, self.flush_lines)

    def metric(self, step: int, key: str, value: float) -> None:
        was_empty = len(self._points) == 0
        if self._points.add(MetricPoint(step=step, key=key, value=value), self._clock(), size=len(key) + 24):
            self.flush_metrics()
        elif was_empty:
            self._metric_timer = asyncio.get_running_loop().call_later(METRIC_FLUSH_S, self.flush_metrics)

    def flush_lines(self) -> None:
        if self._log_timer is not None:
            self._log_timer.cancel()
            self._log_timer = None
        lines = self._lines.take()
        if not lines:
            return
        batch = LogBatch(
            batch_id=new_id(),
            pipeline_id=self._pipeline_id,
            stage=self._stage,
            attempt=self._attempt,
            recorded_at=utcnow(),
            lines=tuple(lines),
        )
        self._outbox.publish_telemetry(self._log_subject, batch.batch_id, codec.encode(batch))

    def flush_metrics(self) -> None:
        if self._metric_timer is not None:
            self._metric_timer.cancel()
            self._metric_timer = None
        points = self._points.take()
        if not points:
            return
        batch = MetricBatch(
            batch_id=new_id(),
            pipeline_id=self._pipeline_id,
            stage=self._stage,
            attempt=self._attempt,
            recorded_at=utcnow(),
            points=tuple(points),
        )
        self._outbox.publish_telemetry(self._metric_subject, batch.batch_id, codec.encode(batch))

    def close(self) -> None:
        self.flush_metrics()
        self.flush_lines()
