"""Pure core: MetricBatch / LogBatch messages -> the rows the persisters insert, after checking them.

A batch that breaks the contract (empty ids, a key or stream name that is too long, a negative step
or offset) is refused whole with `BadTelemetry`: the persister terminates that message and logs why,
rather than redelivering it forever. Over-long log lines are cut, not refused: a log must not be lost
because one line was huge.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import msgspec

from verlyard_shared.telemetry import LogBatch, MetricBatch

MAX_ID: Final = 200
MAX_KEY: Final = 200
MAX_STREAM: Final = 32
MAX_LINE_CHARS: Final = 16_384
MAX_STEP: Final = 2**62
TRUNCATED: Final = " [... line cut]"


class BadTelemetry(ValueError):
    """A telemetry message the API will never be able to store."""


class MetricRow(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    pipeline_id: str
    stage: str
    attempt: str
    step: int
    key: str
    value: float
    recorded_at: datetime


class LogRow(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    pipeline_id: str
    stage: str
    attempt: str
    offset: int
    stream: str
    text: str
    recorded_at: datetime


def _ids(batch: MetricBatch | LogBatch) -> None:
    for name in ("pipeline_id", "stage", "attempt"):
        value: str = getattr(batch, name)
        if not value or len(value) > MAX_ID:
            raise BadTelemetry(f"{name} must be 1..{MAX_ID} characters, got {len(value)}")


def metric_rows(batch: MetricBatch) -> list[MetricRow]:
    _ids(batch)
    rows: list[MetricRow] = []
    for point in batch.points:
        if not point.key or len(point.key) > MAX_KEY:
            raise BadTelemetry(f"metric key must be 1..{MAX_KEY} characters, got {point.key[:40]!r}")
        if not 0 <= point.step < MAX_STEP:
            raise BadTelemetry(f"metric step must be >= 0, got {point.step}")
        rows.append(
            MetricRow(
                pipeline_id=batch.pipeline_id,
                stage=batch.stage,
                attempt=batch.attempt,
                step=point.step,
                key=point.key,
                value=point.value,
                recorded_at=batch.recorded_at,
            )
        )
    return rows


def cut(text: str) -> str:
    """A log line of at most MAX_LINE_CHARS characters (longer ones say they were cut)."""
    if len(text) <= MAX_LINE_CHARS:
        return text
    return text[: MAX_LINE_CHARS - len(TRUNCATED)] + TRUNCATED


def log_rows(batch: LogBatch) -> list[LogRow]:
    _ids(batch)
    rows: list[LogRow] = []
    for line in batch.lines:
        if not 0 <= line.offset < MAX_STEP:
            raise BadTelemetry(f"log offset must be >= 0, got {line.offset}")
        if not line.stream or len(line.stream) > MAX_STREAM:
            raise BadTelemetry(f"log stream name must be 1..{MAX_STREAM} characters")
        rows.append(
            LogRow(
                pipeline_id=batch.pipeline_id,
                stage=batch.stage,
                attempt=batch.attempt,
                offset=line.offset,
                stream=line.stream,
                text=cut(line.text.replace("\x00", "\ufffd")),  # Postgres text cannot hold NUL
                recorded_at=batch.recorded_at,
            )
        )
    return rows
