"""Bench W4 (edge): many diamonds submitted at once; wall time, stages/s, all succeeded, none lost."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.harness import TERMINAL, Client, Result, parse_ts
from bench.w3 import diamond

NAME = "W4"
STAGES_PER_PIPELINE = 4


async def _burst(client: Client, count: int, concurrency: int) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)

    async def submit(i: int) -> str:
        async with gate:
            return await client.submit(diamond(f"w4-{count}-{i}"))

    start = time.perf_counter()
    ids = await asyncio.gather(*(submit(i) for i in range(count)))
    submitted_s = time.perf_counter() - start
    # Wait in submission order with one request in flight, so the waiting adds next to no load.
    for pipeline_id in ids:
        deadline = time.monotonic() + 600
        while (await client.get(pipeline_id))["status"] not in {"succeeded", "failed", "cancelled"}:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pipeline_id} did not end")
            await asyncio.sleep(0.01)
    wall_s = time.perf_counter() - start
    # Then read every log (after the clock stopped) to check each ended succeeded with 4 stage successes.
    gate_read = asyncio.Semaphore(concurrency)

    async def events(pipeline_id: str) -> list[dict[str, Any]]:
        async with gate_read:
            return await client.events_after(pipeline_id, 0)

    logs = await asyncio.gather(*(events(p) for p in ids))
    submitted_at = [parse_ts(e["recorded_at"]) for log in logs for e in log if e["type"] == "pipeline.submitted"]
    ended_at = [parse_ts(e["recorded_at"]) for log in logs for e in log if e["type"] in TERMINAL]
    succeeded = sum(1 for log in logs if any(e["type"] == "pipeline.succeeded" for e in log))
    stage_successes = sum(1 for log in logs for e in log if e["type"] == "stage.succeeded")
    server_s = max(ended_at) - min(submitted_at)
    stages = count * STAGES_PER_PIPELINE
    return {
        "pipelines": count,
        "stages": stages,
        "submit_phase_s": round(submitted_s, 4),
        "submits_per_s": round(count / submitted_s, 1),
        "client_wall_s": round(wall_s, 4),
        "server_wall_s": round(server_s, 4),
        "stages_per_s_server": round(stages / server_s, 1),
        "stages_per_s_client": round(stages / wall_s, 1),
        "succeeded": succeeded,
        "stage_successes": stage_successes,
        "lost_pipelines": count - len(ended_at),
        "lost_stages": stages - stage_successes,
    }


async def run(client: Client, quick: bool) -> Result:
    sizes = [200] if quick else [200, 2000]
    concurrency = 16
    result = Result(NAME, "diamonds submitted at once", {"sizes": sizes, "submit_concurrency": concurrency})
    bursts = [await _burst(client, n, concurrency) for n in sizes]
    result.raw = {"bursts": bursts}
    result.summaries = {str(b["pipelines"]): {k: v for k, v in b.items() if k != "pipelines"} for b in bursts}
    for b in bursts:
        n = b["pipelines"]
        result.check(
            f"{n} diamonds: stages/s (event log)", ">= 1000/s", b["stages_per_s_server"], lambda v: v >= 1000, "/s"
        )
        result.check(
            f"{n} diamonds: all succeeded, 0 lost",
            f"{n} succeeded",
            b["succeeded"],
            lambda v, n=n, b=b: v == n and b["lost_stages"] == 0,
            unit="",
        )
    result.notes.append("stages/s = 4 x pipelines / (last terminal event - first pipeline.submitted), from recorded_at")
    return result
