"""Testing: helpers for the scheduler's integration tests: submit pipelines straight into the store,
run the scheduler in-process or as a `verlyard scheduler` subprocess, wait on the log with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from verlyard_scheduler.fold import PipelineState, fold
from verlyard_scheduler.service import SchedulerConfig, SchedulerService
from verlyard_shared.embedded.nats import EmbeddedNats
from verlyard_shared.envelope import Envelope, Metadata, NewEvent
from verlyard_shared.events import PipelineSubmitted, event_type
from verlyard_shared.ids import new_id, pipeline_stream
from verlyard_shared.nats_topology import connect_nats
from verlyard_shared.store.port import NO_STREAM
from verlyard_shared.store.postgres import PostgresEventStore, connect_pool
from verlyard_shared.validation import validate_pipeline

ROOT = Path(__file__).resolve().parents[2]

LINEAR = {"a": {}, "b": {"needs": ["a"]}, "c": {"needs": ["b"]}}
DIAMOND = {"a": {}, "b": {"needs": ["a"]}, "c": {"needs": ["a"]}, "d": {"needs": ["b", "c"]}}


def fan_out(width: int) -> dict[str, dict[str, Any]]:
    stages: dict[str, dict[str, Any]] = {"src": {}}
    for i in range(width):
        stages[f"w{i}"] = {"needs": ["src"]}
    stages["sink"] = {"needs": [f"w{i}" for i in range(width)]}
    return stages


async def submit(store: PostgresEventStore, stages: dict[str, dict[str, Any]], *, name: str = "p") -> str:
    """Append `pipeline.submitted` (stages default to `kind: noop`) as the API would; returns its id."""
    doc = {"name": name, "stages": {n: {"kind": "noop", **body} for n, body in stages.items()}}
    spec = validate_pipeline(doc)
    pid = new_id()
    await store.append(
        pipeline_stream(pid),
        NO_STREAM,
        [NewEvent(event_id=new_id(), event=PipelineSubmitted(pipeline_id=pid, spec=spec))],
        Metadata(actor="test", correlation_id=pid),
    )
    return pid


async def until(check: Callable[[], Awaitable[object]], *, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


async def history(store: PostgresEventStore, pid: str) -> list[Envelope]:
    return await store.read_stream(pipeline_stream(pid))


async def state_of(store: PostgresEventStore, pid: str) -> PipelineState:
    return fold(await history(store, pid))


def types(log: list[Envelope]) -> list[str]:
    return [event_type(e.event) for e in log]


async def wait_terminal(store: PostgresEventStore, pids: list[str], *, timeout: float) -> dict[str, PipelineState]:
    states: dict[str, PipelineState] = {}

    async def done() -> bool:
        for pid in pids:
            if pid not in states:
                state = await state_of(store, pid)
                if state.terminal:
                    states[pid] = state
        return len(states) == len(pids)

    await until(done, timeout=timeout, what=f"{len(pids)} pipelines to end", every=0.1)
    return states


@contextlib.asynccontextmanager
async def scheduler(
    pg_url: str, nats_url: str, *, live_load: bool = True, **config: Any
) -> AsyncIterator[SchedulerService]:
    """A SchedulerService running in this event loop until the block ends. `live_load=False` makes it
    fold the whole log from position 0 instead of reading only the live streams."""
    pool = await connect_pool(pg_url, min_size=1, max_size=4)
    nc = await connect_nats(nats_url, name="test-scheduler")
    stop = asyncio.Event()
    service = SchedulerService(
        dsn=pg_url,
        store=PostgresEventStore(pool),
        js=nc.jetstream(),
        pool=pool if live_load else None,
        config=SchedulerConfig(**config),
    )
    task = asyncio.create_task(service.run(stop))
    try:
        await asyncio.wait_for(service.leading.wait(), timeout=10)
        yield service
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=10)
        finally:
            await nc.close()
            await pool.close()


def spawn_scheduler(
    pg_url: str, nats: EmbeddedNats, log_path: Path, *, lease_s: float = 2.0
) -> subprocess.Popen[bytes]:
    """`python -m verlyard_shared.cli scheduler` with its settings in the environment."""
    env = {
        **os.environ,
        "VERLYARD_DATABASE_URL": pg_url,
        "VERLYARD_NATS_URL": nats.url,
        "VERLYARD_NATS_USER": nats.user,
        "VERLYARD_NATS_PASSWORD": nats.password,
        "VERLYARD_LEASE_S": str(lease_s),
        "VERLYARD_LOG_FORMAT": "json",
        "VERLYARD_LOG_LEVEL": "info",
    }
    out = log_path.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "verlyard_shared.cli", "scheduler"], env=env, cwd=ROOT, stdout=out, stderr=out
        )
    finally:
        out.close()


def log_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines a subprocess wrote (other lines skipped)."""
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(msgspec.DecodeError):
            value = msgspec.json.decode(line)
            if isinstance(value, dict):
                out.append(value)
    return out
