"""Test support for the GPU agent's integration tests: the test plays the scheduler.

It publishes RunStage / CancelAttempt / DrainAgent to the agent's command subjects with the codec and
reads what the agent sent from VY_REPORTS / VY_LOGS / VY_METRICS by sequence (a direct get, so the
work-queue reports stay where they are).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from verlyard_agent.agent import Agent, AgentConfig
from verlyard_agent.inventory import GpuProbe
from verlyard_agent.watchdog import WatchdogPolicy
from verlyard_shared import codec, subjects
from verlyard_shared.commands import CancelAttempt, Command, DrainAgent, RunStage
from verlyard_shared.embedded.nats import EmbeddedNats
from verlyard_shared.events import GpuInfo
from verlyard_shared.ids import new_id
from verlyard_shared.reports import AgentHeartbeat, AttemptFinishedReport, GpuStatus
from verlyard_shared.spec import StageSpec
from verlyard_shared.telemetry import LogBatch, MetricBatch

T = TypeVar("T")


class NoGpus(GpuProbe):
    """A probe for a CPU host (the tests never depend on the machine's GPUs)."""

    def inventory(self) -> tuple[GpuInfo, ...]:
        return ()

    def status(self) -> tuple[GpuStatus, ...]:
        return ()

    def processes(self, indices: Any) -> dict[int, tuple[int, ...]]:
        return {}


def agent_config(tmp_path: Path, server: EmbeddedNats, agent_id: str = "agent-1", **overrides: Any) -> AgentConfig:
    config = AgentConfig(
        agent_id=agent_id,
        data_dir=tmp_path / "agent-data" / agent_id,
        datasets_dir=tmp_path / "datasets",
        nats_url=server.url,
        nats_user=server.user,
        nats_password=server.password,
        heartbeat_s=0.5,
        cancel_grace_s=2.0,
        watchdog=WatchdogPolicy(floor_s=60.0),
        host_env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
        flush_on_exit_s=3.0,
    )
    return replace(config, **overrides)


@contextlib.asynccontextmanager
async def running_agent(config: AgentConfig) -> AsyncIterator[Agent]:
    """An in-process agent, ready to take commands; stopped (hard) at the end."""
    agent = Agent(config, probe=NoGpus())
    task = asyncio.create_task(agent.run())
    try:
        await eventually(lambda: agent.ready.is_set() or task.done(), timeout=20)
        if task.done():
            task.result()
        yield agent
    finally:
        if not task.done():
            agent.request_stop()
            agent.request_stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=30)


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], *, timeout: float = 10.0, every: float = 0.05
) -> None:
    """Poll `check` until it is true; fail with a clear message at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(every)


def run_stage(
    agent_id: str,
    kind: str,
    params: dict[str, Any] | None = None,
    *,
    pipeline_id: str | None = None,
    stage: str = "s1",
    attempt: str | None = None,
    inputs: dict[str, Any] | None = None,
    timeout_s: float | None = None,
) -> RunStage:
    attempt = attempt or new_id()
    return RunStage(
        command_id=attempt,
        agent=agent_id,
        issued_at=datetime.now(UTC),
        pipeline_id=pipeline_id or new_id(),
        pipeline_name="test-pipeline",
        stage=stage,
        attempt=attempt,
        attempt_number=1,
        spec=StageSpec(kind=kind, params=params or {}, timeout_s=timeout_s),  # type: ignore[arg-type]
        inputs=inputs or {},
    )


def cancel(command: RunStage, reason: str = "cancelled by user") -> CancelAttempt:
    return CancelAttempt(
        command_id=f"cancel-{command.attempt}",
        agent=command.agent,
        issued_at=datetime.now(UTC),
        pipeline_id=command.pipeline_id,
        stage=command.stage,
        attempt=command.attempt,
        reason=reason,
    )


def drain(agent_id: str) -> DrainAgent:
    return DrainAgent(command_id=new_id(), agent=agent_id, issued_at=datetime.now(UTC), reason="maintenance")


_KINDS = {RunStage: "run_stage", CancelAttempt: "cancel_attempt", DrainAgent: "drain"}


async def send(js: JetStreamContext, command: Command, *, msg_id: str | None = None) -> None:
    """Publish a command as the scheduler does (`msg_id` other than command_id: a re-derived copy)."""
    await js.publish(
        subjects.command_subject(command.agent, _KINDS[type(command)]),
        codec.encode(command),
        headers={"Nats-Msg-Id": msg_id or command.command_id},
    )


async def stream_payloads(js: JetStreamContext, stream: str) -> list[bytes]:
    info = await js.stream_info(stream)
    out: list[bytes] = []
    if info.state.messages == 0:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(stream, seq)
        except NotFoundError:
            continue
        if msg.data is not None:
            out.append(msg.data)
    return out


async def reports(js: JetStreamContext, attempt: str | None = None) -> list[Any]:
    decoded = [codec.decode_report(p) for p in await stream_payloads(js, subjects.STREAM_REPORTS)]
    if attempt is None:
        return decoded
    return [r for r in decoded if getattr(r, "attempt", None) == attempt]


def kinds(items: list[Any]) -> list[str]:
    return [type(r).__name__ for r in items if not isinstance(r, AgentHeartbeat)]


async def finished(js: JetStreamContext, attempt: str, *, timeout: float = 20.0) -> AttemptFinishedReport:
    found: list[AttemptFinishedReport] = []

    async def check() -> bool:
        found[:] = [r for r in await reports(js, attempt) if isinstance(r, AttemptFinishedReport)]
        return bool(found)

    await eventually(check, timeout=timeout, every=0.1)
    return found[0]


async def log_lines(js: JetStreamContext, attempt: str) -> list[tuple[int, str, str]]:
    lines: list[tuple[int, str, str]] = []
    for payload in await stream_payloads(js, subjects.STREAM_LOGS):
        batch = codec.decode_telemetry(payload)
        if isinstance(batch, LogBatch) and batch.attempt == attempt:
            lines += [(line.offset, line.stream, line.text) for line in batch.lines]
    return sorted(lines)


async def metric_points(js: JetStreamContext, attempt: str) -> list[tuple[int, str, float]]:
    points: list[tuple[int, str, float]] = []
    for payload in await stream_payloads(js, subjects.STREAM_METRICS):
        batch = codec.decode_telemetry(payload)
        if isinstance(batch, MetricBatch) and batch.attempt == attempt:
            points += [(p.step, p.key, p.value) for p in batch.points]
    return points


async def push_dataset(tmp_path: Path, js: JetStreamContext, name: str, data: bytes) -> str:
    """What the API does on upload (its own adapter): the blob under its sha256 and the name pointer."""
    from verlyard_api.adapters.dataset_store import DatasetStore

    async def chunks() -> AsyncIterator[bytes]:
        yield data

    store = DatasetStore(tmp_path / "api-datasets", js=js)
    await asyncio.to_thread((tmp_path / "api-datasets").mkdir)
    received = await store.receive(chunks(), limit=1 << 20)
    await store.commit(received)
    await store.publish(sha256=received.sha256, name=name, dataset_id="d1", size_bytes=received.size_bytes)
    return received.sha256
