"""Contracts: metric points and log lines, batched, on `vy.met.<pipeline>.<stage>` / `vy.log.<pipeline>.<stage>`."""

from __future__ import annotations

from datetime import datetime

import msgspec


class MetricPoint(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    step: int
    key: str
    value: float


class MetricBatch(msgspec.Struct, frozen=True, kw_only=True, tag="tel.metrics", tag_field="type"):
    """Metrics keyed by (pipeline, stage, attempt, step, key). `batch_id` is the Nats-Msg-Id."""

    batch_id: str
    pipeline_id: str
    stage: str
    attempt: str
    recorded_at: datetime
    points: tuple[MetricPoint, ...]


class LogLine(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    offset: int
    """Line number within the attempt's log, from 0: lets readers page and dedupe."""
    stream: str
    text: str


class LogBatch(msgspec.Struct, frozen=True, kw_only=True, tag="tel.logs", tag_field="type"):
    batch_id: str
    pipeline_id: str
    stage: str
    attempt: str
    recorded_at: datetime
    lines: tuple[LogLine, ...]


AnyTelemetry = MetricBatch | LogBatch
TELEMETRY_TYPES: tuple[type[msgspec.Struct], ...] = (MetricBatch, LogBatch)
