"""Bench L1 (edge): a metric written by verl -> seen on the pipeline's live stream (SSE), p50/p95.

A real verl SFT run (the A1 setup: tiny Qwen2, CPU launcher, more steps) goes through the stack while
this process watches two things on one monotonic clock:
- verl's metrics file in the attempt's work folder (`metrics.jsonl`, the file logger the agent tails),
  polled every `FILE_POLL_S`: when each step's record first appears, i.e. when verl wrote it;
- the API's live stream `GET /api/v1/pipelines/{id}/stream`: when the step's `train/loss` point arrives.
Latency per step = stream time - file time. The file poll can notice a record up to `FILE_POLL_S`
late, so the figures can read up to that much low; the notes say so.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from bench.a1 import _assets, _params, trainer_python
from bench.harness import Client, Result, summary

NAME = "L1"
FILE_POLL_S = 0.002
KEY = "train/loss"


async def _watch_file(home: Path, pipeline_id: str, seen: dict[int, float], done: asyncio.Event) -> None:
    # Blocking reads on purpose: tiny, local, and a hop to a worker thread would add jitter to the clock.
    path: Path | None = None
    offset = 0
    pending = b""
    while not done.is_set():
        if path is None:
            found = sorted(home.glob(f"**/pipelines/{pipeline_id}/train/attempts/*/metrics.jsonl"))  # noqa: ASYNC240
            path = found[0] if found else None
        if path is not None:
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            now = time.monotonic()
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if KEY in record.get("data", {}):
                    seen.setdefault(int(record["step"]), now)
        await asyncio.sleep(FILE_POLL_S if path is not None else 0.02)


async def _watch_stream(client: Client, pipeline_id: str, seen: dict[int, float], done: asyncio.Event) -> None:
    event = ""
    async with client.stream_http.stream("GET", f"/api/v1/pipelines/{pipeline_id}/stream", timeout=None) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "metrics":
                now = time.monotonic()
                for point in json.loads(line.split(":", 1)[1])["points"]:
                    if point["key"] == KEY:
                        seen.setdefault(int(point["step"]), now)
            elif line.startswith("data:") and event == "end":
                break
    done.set()


async def _one_run(client: Client, params: dict[str, Any], i: int) -> list[float]:
    pipeline_id = await client.submit({"name": f"l1-{i}", "stages": {"train": {"kind": "train", "with": params}}})
    written: dict[int, float] = {}
    streamed: dict[int, float] = {}
    done = asyncio.Event()
    watcher = asyncio.create_task(_watch_file(client.stack_home, pipeline_id, written, done))
    try:
        await asyncio.wait_for(_watch_stream(client, pipeline_id, streamed, done), timeout=900)
    finally:
        done.set()
        await watcher
    events = await client.events_after(pipeline_id, 0)
    if not any(e["type"] == "pipeline.succeeded" for e in events):
        raise RuntimeError(f"L1 pipeline {pipeline_id} did not succeed: {[e['type'] for e in events]}")
    steps = sorted(set(written) & set(streamed))
    if not steps:
        raise RuntimeError(f"L1 saw no step both in the file and on the stream ({written=}, {streamed=})")
    return [(streamed[s] - written[s]) * 1000 for s in steps]


async def run(client: Client, quick: bool) -> Result:
    python = trainer_python()
    if python is None:
        raise RuntimeError("L1 needs the trainer env: run scripts/trainer-env.sh (make bench does)")
    runs, steps = (1, 20) if quick else (2, 40)
    result = Result(NAME, "verl metric written -> seen on the live stream (SSE)", {"runs": runs, "steps": steps})
    params = _params(await asyncio.to_thread(_assets, python))
    params["overrides"] = {"trainer.total_training_steps": steps}
    params["save_every"] = steps
    params["epochs"] = 3  # the tiny dataset has 14 batches an epoch; verl stops at total_training_steps
    latencies: list[float] = []
    for i in range(runs):
        latencies.extend(await _one_run(client, params, i))
    result.raw = {"latency_ms": latencies}
    result.summaries = {"latency_ms": summary(latencies)}
    s = result.summaries["latency_ms"]
    result.check("metric -> live stream p50", "<= 100 ms", s["p50"], lambda v: v <= 100)
    result.check("metric -> live stream p95", "(reported)", s["p95"], lambda v: True)
    result.notes.append(
        f"{len(latencies)} steps; the metrics file is polled every {FILE_POLL_S * 1000:.0f} ms, "
        "so a figure can read up to that much low"
    )
    return result
