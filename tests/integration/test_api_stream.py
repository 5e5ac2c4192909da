"""Integration: a pipeline's live stream (SSE) merges its events, metric points and log lines; every message's
id is a cursor, so a reconnect with Last-Event-ID loses nothing and repeats nothing; the stream ends once the
pipeline has finished. Also measures publish-to-client latency of a metric point (informally)."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from nats.js import JetStreamContext

from tests.integration.api_app import ApiEnv, api_env, served
from tests.integration.telemetry_kit import placed, publish_logs, publish_metrics, telemetry_running
from tests.integration.test_api_events import read_sse
from verlyard_api.cursor import decode_cursor
from verlyard_shared.events import PipelineSucceeded, StagePlaced


@pytest.fixture
async def api(pg_pool: asyncpg.Pool) -> AsyncIterator[ApiEnv]:
    async with api_env(pg_pool) as env:
        yield env


def _points(messages: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
    return [
        (p["attempt"], p["step"], p["key"]) for m in messages if m["event"] == "metrics" for p in m["data"]["points"]
    ]


def _lines(messages: list[dict[str, Any]]) -> list[int]:
    return [line["offset"] for m in messages if m["event"] == "logs" for line in m["data"]["lines"]]


async def _until(lines: AsyncIterator[str], done: Any, limit: int = 200) -> list[dict[str, Any]]:
    """Messages until `done(collected)` is true."""
    got: list[dict[str, Any]] = []
    while not done(got):
        got.extend(await asyncio.wait_for(read_sse(lines, 1), 10))
        assert len(got) < limit
    return got


async def test_stream_merges_sources_resumes_exactly_and_ends(api: ApiEnv, js: JetStreamContext) -> None:
    pid = (await api.submit())["id"]
    await api.scheduler(pid, placed(pid, "prep", "p1", 1))
    async with telemetry_running(api, js), served(api.app) as base:
        await publish_metrics(js, pid, "prep", "p1", [(s, "loss", 1.0 / s) for s in range(1, 11)])
        await publish_logs(js, pid, "prep", "p1", [(i, f"line {i}") for i in range(3)])
        headers = api.auth("viewer")
        async with httpx.AsyncClient(base_url=base, timeout=15) as client:
            async with client.stream("GET", f"/api/v1/pipelines/{pid}/stream", headers=headers) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                lines = response.aiter_lines()
                backlog = await _until(lines, lambda got: len(_points(got)) == 10 and len(_lines(got)) == 3)
                assert [m["event"] for m in backlog if m["event"].startswith(("pipeline", "stage"))] == [
                    "pipeline.submitted",
                    "stage.placed",
                ]
                assert backlog[0]["data"]["data"]["pipeline_id"] == pid
                cursors = [decode_cursor(m["id"]) for m in backlog]
                assert all(
                    b.events >= a.events and b.metrics >= a.metrics and b.logs >= a.logs
                    for a, b in itertools.pairwise(cursors)
                )

                last_id = backlog[-1]["id"]
                # Latency: from the agent's publish to the client's read, one point at a time.
                latencies: list[float] = []
                for step in range(11, 31):
                    started = time.perf_counter()
                    await publish_metrics(js, pid, "prep", "p1", [(step, "loss", 1.0 / step)])
                    live = await _until(lines, lambda got: bool(_points(got)))
                    latencies.append(time.perf_counter() - started)
                    assert _points(live) == [("p1", step, "loss")]
                    last_id = live[-1]["id"]
                p50 = statistics.median(latencies)
                print(f"metric publish -> SSE client: p50 {p50 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")
                assert p50 < 0.5  # generous for a loaded 2-core CI box; measured ~15-30 ms idle

            # While disconnected: an event, points and lines.
            await api.scheduler(
                pid, StagePlaced(pipeline_id=pid, stage="train", attempt="t1", attempt_number=1, agent="g")
            )
            await publish_metrics(js, pid, "prep", "p1", [(s, "loss", 0.0) for s in range(31, 41)])
            await publish_logs(js, pid, "prep", "p1", [(3, "while away")])
            await asyncio.sleep(0.3)
            await api.scheduler(pid, PipelineSucceeded(pipeline_id=pid))
            resume = headers | {"Last-Event-ID": last_id}
            async with client.stream("GET", f"/api/v1/pipelines/{pid}/stream", headers=resume) as response:
                rest = await _until(response.aiter_lines(), lambda got: bool(got) and got[-1]["event"] == "end")
            assert [m["event"] for m in rest if "." in m["event"]] == ["stage.placed", "pipeline.succeeded"]
            assert _points(rest) == [("p1", s, "loss") for s in range(31, 41)]
            assert _lines(rest) == [3]
            # The same cursor as a query parameter; a bad one is a 400.
            again = await client.get(f"/api/v1/pipelines/{pid}/stream?cursor={rest[-1]['id']}", headers=headers)
            assert again.status_code == 200 and "event: end" in again.text
            bad = await client.get(f"/api/v1/pipelines/{pid}/stream", headers=headers | {"Last-Event-ID": "42"})
            assert bad.status_code == 400 and bad.json()["error"] == "invalid_cursor"


async def test_stream_404_and_auth(api: ApiEnv) -> None:
    assert (await api.client.get("/api/v1/pipelines/nope/stream", headers=api.auth("viewer"))).status_code == 404
    pid = (await api.submit())["id"]
    assert (await api.client.get(f"/api/v1/pipelines/{pid}/stream")).status_code == 401
    bad = await api.client.get(f"/api/v1/pipelines/{pid}/stream", headers={"Authorization": "Bearer vy_" + "x" * 43})
    assert bad.status_code == 401
