"""Bench W5 (edge): diamond where C fails; C's failure -> pipeline failed latency, and D never placed."""

from __future__ import annotations

from bench.harness import Client, Result, at, first, summary
from bench.sequential import run_sequential
from bench.w3 import diamond

NAME = "W5"


async def run(client: Client, quick: bool) -> Result:
    count = 30 if quick else 50
    result = Result(NAME, "diamond, C fails (noop fail: true)", {"pipelines": count, "sleep_ms": 0})
    runs = await run_sequential(client, lambda i: diamond(f"w5-{i}", fail_c=True), count)
    latency = [(at(r.events, "pipeline.failed") - at(r.events, "stage.failed", "c")) * 1000 for r in runs]
    d_placed = [r.pipeline_id for r in runs if first(r.events, "stage.placed", "d") is not None]
    not_failed = [r.pipeline_id for r in runs if first(r.events, "pipeline.failed") is None]
    result.raw = {
        "pipeline_ids": [r.pipeline_id for r in runs],
        "c_failed_to_pipeline_failed_ms": latency,
        "client_wall_ms": [r.wall_ms for r in runs],
        "d_placed_in": d_placed,
        "not_failed": not_failed,
    }
    result.summaries = {
        "c_failed_to_pipeline_failed_ms": summary(latency),
        "client_wall_ms": summary(result.raw["client_wall_ms"]),
        "d_placed_count": len(d_placed),
    }
    result.check("C failed -> pipeline failed p50", "<= 10 ms", summary(latency)["p50"], lambda v: v <= 10)
    result.check("pipelines where D was placed", "0", len(d_placed), lambda v: v == 0, unit="")
    return result
