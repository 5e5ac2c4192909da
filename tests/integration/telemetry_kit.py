"""Test helpers: the API's telemetry persisters and listeners running against real NATS and Postgres, and
publishers that send what an agent sends (MetricBatch / LogBatch with Nats-Msg-Id = batch_id)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
from nats.js import JetStreamContext

from tests.integration.api_app import ApiEnv
from verlyard_api.adapters.nats_telemetry import TelemetryPersister
from verlyard_api.adapters.pg_telemetry_listen import TelemetryListener
from verlyard_shared import codec, subjects
from verlyard_shared.events import StageFailed, StagePlaced, StageRetryScheduled
from verlyard_shared.ids import new_id
from verlyard_shared.telemetry import LogBatch, LogLine, MetricBatch, MetricPoint


@contextlib.asynccontextmanager
async def telemetry_running(api: ApiEnv, js: JetStreamContext) -> AsyncIterator[dict[str, TelemetryPersister]]:
    """Both persisters, the telemetry listener and the event listener, as `serve()` runs them."""
    stop = asyncio.Event()
    services = api.deps.services
    persisters = {
        kind: TelemetryPersister(js, api.deps.pool, kind, on_commit=services.committed, ops=services.ops)  # type: ignore[arg-type]
        for kind in ("metric", "log")
    }
    assert api.deps.pool is not None
    tasks = [asyncio.create_task(p.run(stop)) for p in persisters.values()]
    tasks.append(asyncio.create_task(TelemetryListener(api.deps.pool, services.telemetry).run(stop)))
    tasks.append(asyncio.create_task(api.ctx.listener.run(stop)))
    try:
        yield persisters
    finally:
        stop.set()
        for task in tasks:
            await asyncio.wait_for(task, 15)


async def publish_metrics(
    js: JetStreamContext,
    pipeline_id: str,
    stage: str,
    attempt: str,
    points: list[tuple[int, str, float]],
    *,
    batch_id: str | None = None,
) -> str:
    batch = MetricBatch(
        batch_id=batch_id or new_id(),
        pipeline_id=pipeline_id,
        stage=stage,
        attempt=attempt,
        recorded_at=datetime.now(UTC),
        points=tuple(MetricPoint(step=s, key=k, value=v) for s, k, v in points),
    )
    await js.publish(
        subjects.metric_subject(pipeline_id, stage), codec.encode(batch), headers={"Nats-Msg-Id": batch.batch_id}
    )
    return batch.batch_id


async def publish_logs(
    js: JetStreamContext,
    pipeline_id: str,
    stage: str,
    attempt: str,
    lines: list[tuple[int, str]],
    *,
    batch_id: str | None = None,
) -> None:
    batch = LogBatch(
        batch_id=batch_id or new_id(),
        pipeline_id=pipeline_id,
        stage=stage,
        attempt=attempt,
        recorded_at=datetime.now(UTC),
        lines=tuple(LogLine(offset=o, stream="stdout", text=t) for o, t in lines),
    )
    await js.publish(
        subjects.log_subject(pipeline_id, stage), codec.encode(batch), headers={"Nats-Msg-Id": batch.batch_id}
    )


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def count(pool: asyncpg.Pool, table: str, pipeline_id: str) -> int:
    assert table in ("metrics", "log_lines")
    return int(await pool.fetchval(f"SELECT count(*) FROM {table} WHERE pipeline_id = $1", pipeline_id))


def placed(
    pid: str, stage: str, attempt: str, number: int, *, resume: int | None = None, agent: str = "g1"
) -> StagePlaced:
    return StagePlaced(
        pipeline_id=pid,
        stage=stage,
        attempt=attempt,
        attempt_number=number,
        agent=agent,
        gpus=(0,),
        resume_from_step=resume,
    )


def failed_and_retried(pid: str, stage: str, attempt: str, number: int) -> list[StageFailed | StageRetryScheduled]:
    return [
        StageFailed(pipeline_id=pid, stage=stage, attempt=attempt, failure_class="infra", reason="node died"),
        StageRetryScheduled(
            pipeline_id=pid, stage=stage, attempt=attempt, next_attempt_number=number + 1, not_before=datetime.now(UTC)
        ),
    ]
