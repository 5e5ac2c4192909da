"""Adapter: the telemetry persisters. Pull MetricBatch / LogBatch messages from the durable consumers
`api-metrics` / `api-logs` in batches, insert them in one transaction, ack after commit.

- Idempotent: the tables' keys make a redelivered batch insert nothing, so ack-after-commit is safe.
- A message that can never be stored (not JSON, the wrong type, breaks the contract) is terminated and
  logged, never redelivered forever.
- Postgres down: the batch is nak'ed with a delay and retried; nothing is acked before it is stored.
- Latency: `verlyard_shared.nats_fetch.fetch_ready` waits for ONE message, then takes what the consumer
  already holds without waiting: a lone point is stored at once instead of after a batch timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Literal

import asyncpg
import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from verlyard_api.adapters.pg_telemetry import store_logs, store_metrics
from verlyard_api.promtext import OpsMetrics
from verlyard_api.telemetry import BadTelemetry, LogRow, MetricRow, log_rows, metric_rows
from verlyard_shared import subjects
from verlyard_shared.codec import DecodeError, ValidationError, decode_telemetry
from verlyard_shared.nats_fetch import fetch_ready
from verlyard_shared.telemetry import LogBatch, MetricBatch

log = structlog.get_logger("verlyard.api.telemetry")

Kind = Literal["metric", "log"]
BATCH: Final = 1000
"""Messages per transaction at most (each holds up to ~500 points or 200 lines)."""
WAIT_S: Final = 1.0
RETRY_DELAY_S: Final = 2.0

_CONSUMERS: Final = {
    "metric": (subjects.CONSUMER_API_METRICS, subjects.STREAM_METRICS),
    "log": (subjects.CONSUMER_API_LOGS, subjects.STREAM_LOGS),
}


class TelemetryPersister:
    def __init__(
        self,
        js: JetStreamContext,
        pool: asyncpg.Pool,
        kind: Kind,
        *,
        on_commit: Callable[[set[str]], None] | None = None,
        ops: OpsMetrics | None = None,
        batch: int = BATCH,
    ) -> None:
        self._js = js
        self._pool = pool
        self.kind: Kind = kind
        self._on_commit = on_commit
        self._ops = ops or OpsMetrics()
        self._batch = batch
        self._log = log.bind(kind=kind)
        self.stored = 0
        """Rows inserted by this persister (duplicates not counted)."""

    async def run(self, stop: asyncio.Event) -> None:
        durable, stream = _CONSUMERS[self.kind]
        delay = 0.2
        while not stop.is_set():
            try:
                sub = await self._js.pull_subscribe_bind(durable=durable, stream=stream)
            except Exception as exc:  # NATS down or the topology not ensured yet
                self._log.warning("telemetry_subscribe_failed", error=type(exc).__name__, retry_in_s=delay)
                await _sleep_or_stop(stop, delay)
                delay = min(delay * 2, 5.0)
                continue
            self._log.info("telemetry_persister_started", durable=durable)
            try:
                await self._loop(sub, stop)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self._log.info("telemetry_persister_stopped", stored=self.stored)

    async def _loop(self, sub: JetStreamContext.PullSubscription, stop: asyncio.Event) -> None:
        delay = 0.2
        while not stop.is_set():
            try:
                msgs = await fetch_ready(sub, self._batch, WAIT_S)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as exc:
                self._log.warning("telemetry_fetch_failed", error=type(exc).__name__, retry_in_s=delay)
                await _sleep_or_stop(stop, delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.2
            if not await self.handle(msgs):
                await _sleep_or_stop(stop, RETRY_DELAY_S)

    async def handle(self, msgs: Sequence[Msg]) -> bool:
        """Store, then ack, one batch of messages; False when the database refused it (naked for later)."""
        good: list[Msg] = []
        metrics: list[MetricRow] = []
        logs: list[LogRow] = []
        for msg in msgs:
            try:
                telemetry = decode_telemetry(msg.data)
                if self.kind == "metric":
                    if not isinstance(telemetry, MetricBatch):
                        raise BadTelemetry(f"a {type(telemetry).__name__} on a metrics subject")
                    metrics.extend(metric_rows(telemetry))
                else:
                    if not isinstance(telemetry, LogBatch):
                        raise BadTelemetry(f"a {type(telemetry).__name__} on a logs subject")
                    logs.extend(log_rows(telemetry))
            except (DecodeError, ValidationError, BadTelemetry) as exc:
                self._log.warning("telemetry_rejected", subject=msg.subject, error=type(exc).__name__, detail=str(exc))
                self._ops.count(self.kind, "rejected")
                await _quietly(msg.term())
                continue
            good.append(msg)
        rows: Sequence[MetricRow] | Sequence[LogRow] = metrics if self.kind == "metric" else logs
        try:
            async with asyncio.timeout(30):
                stored = await (
                    store_metrics(self._pool, metrics) if self.kind == "metric" else store_logs(self._pool, logs)
                )
        except Exception as exc:
            self._log.warning("telemetry_store_failed", error=type(exc).__name__, messages=len(good))
            for msg in good:
                await _quietly(msg.nak(delay=RETRY_DELAY_S))
            return False
        for msg in good:
            await _quietly(msg.ack())
        self.stored += stored
        self._ops.count(self.kind, "stored", stored)
        self._ops.count(self.kind, "duplicate", len(rows) - stored)
        if self._on_commit is not None and rows:
            self._on_commit({r.pipeline_id for r in rows})
        return True


async def _quietly(call: Awaitable[Any]) -> None:
    # An ack that cannot be sent (NATS just went away) is redelivered later and deduplicated by the keys.
    with contextlib.suppress(Exception):
        await call


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
