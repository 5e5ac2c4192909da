"""Bench W2 (edge): a 3-stage chain, N sequential pipelines; p95 <= 2 x p50 (no stalls)."""

from __future__ import annotations

from bench.harness import Client, Result, at, stage, summary
from bench.sequential import run_sequential

NAME = "W2"


async def run(client: Client, quick: bool) -> Result:
    count = 30 if quick else 50
    result = Result(NAME, "3-stage chain a->b->c, sequential pipelines", {"pipelines": count, "sleep_ms": 0})
    spec = {"stages": {"a": stage(), "b": stage(needs=["a"]), "c": stage(needs=["b"])}}
    runs = await run_sequential(client, lambda i: {"name": f"w2-{i}"} | spec, count)
    server = [(at(r.events, "pipeline.succeeded") - at(r.events, "pipeline.submitted")) * 1000 for r in runs]
    result.raw = {
        "pipeline_ids": [r.pipeline_id for r in runs],
        "submit_to_succeeded_ms": server,
        "client_wall_ms": [r.wall_ms for r in runs],
    }
    result.summaries = {k: summary(v) for k, v in result.raw.items() if k != "pipeline_ids"}
    s = summary(server)
    ratio = s["p95"] / s["p50"] if s["p50"] else float("inf")
    result.check("p95 / p50 (event log)", "<= 2.0", ratio, lambda v: v <= 2.0, unit="x")
    result.notes.append(
        "the middle stage runs in a CPU slot: the local agent of `verlyard up` has no GPU, and a GPU "
        "request would stay pending; so this measures the chain's hand-offs, not GPU-class placement"
    )
    return result
