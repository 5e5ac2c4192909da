"""Bench (edge): submit pipelines one after another and collect each one's events and client wall time."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.harness import Client

WARMUP = 3
"""Unmeasured pipelines first: connections, prepared statements and code paths are warm when we measure."""


@dataclass
class Run:
    pipeline_id: str
    wall_ms: float
    events: list[dict[str, Any]]


async def run_sequential(client: Client, make_spec: Callable[[int], dict[str, Any]], count: int) -> list[Run]:
    for i in range(WARMUP):
        await client.wait_events(await client.submit(make_spec(-1 - i)))
    runs: list[Run] = []
    for i in range(count):
        start = time.perf_counter()
        pipeline_id = await client.submit(make_spec(i))
        events = await client.wait_events(pipeline_id)
        runs.append(Run(pipeline_id, (time.perf_counter() - start) * 1000, events))
    return runs
