"""Bench W1 (edge): a single `noop` stage, N sequential pipelines; submit -> completed latency."""

from __future__ import annotations

from bench.harness import Client, Result, at, stage, summary
from bench.sequential import run_sequential

NAME = "W1"


async def run(client: Client, quick: bool) -> Result:
    count = 30 if quick else 50
    result = Result(NAME, "single noop stage, sequential pipelines", {"pipelines": count, "sleep_ms": 0})
    runs = await run_sequential(client, lambda i: {"name": f"w1-{i}", "stages": {"a": stage()}}, count)
    server = [(at(r.events, "pipeline.succeeded") - at(r.events, "pipeline.submitted")) * 1000 for r in runs]
    placed = [(at(r.events, "stage.placed", "a") - at(r.events, "pipeline.submitted")) * 1000 for r in runs]
    ran = [(at(r.events, "stage.succeeded", "a") - at(r.events, "stage.placed", "a")) * 1000 for r in runs]
    closed = [(at(r.events, "pipeline.succeeded") - at(r.events, "stage.succeeded", "a")) * 1000 for r in runs]
    accepted = [(at(r.events, "attempt.accepted", "a") - at(r.events, "stage.placed", "a")) * 1000 for r in runs]
    started = [(at(r.events, "attempt.started", "a") - at(r.events, "attempt.accepted", "a")) * 1000 for r in runs]
    finished = [(at(r.events, "stage.succeeded", "a") - at(r.events, "attempt.started", "a")) * 1000 for r in runs]
    wall = [r.wall_ms for r in runs]
    result.raw = {
        "pipeline_ids": [r.pipeline_id for r in runs],
        "submit_to_succeeded_ms": server,
        "client_wall_ms": wall,
        "submitted_to_placed_ms": placed,
        "placed_to_stage_succeeded_ms": ran,
        "placed_to_accepted_ms": accepted,
        "accepted_to_started_ms": started,
        "started_to_stage_succeeded_ms": finished,
        "stage_succeeded_to_pipeline_succeeded_ms": closed,
        "event_types_first_run": [e["type"] for e in runs[0].events],
    }
    result.summaries = {
        k: summary(v) for k, v in result.raw.items() if k not in {"pipeline_ids", "event_types_first_run"}
    }
    result.check("submit->completed p50 (event log)", "<= 5 ms", summary(server)["p50"], lambda v: v <= 5)
    result.notes.append(
        f"client wall p50 {summary(wall)['p50']} ms (HTTP submit + audit-log poll every 5 ms, not a target)"
    )
    return result
