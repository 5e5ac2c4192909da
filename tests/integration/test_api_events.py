"""Integration: the global event log, paginated and as a live SSE stream resumable with Last-Event-ID."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from tests.integration.api_app import ApiEnv, api_env, served
from verlyard_shared.events import StagePlaced

AUDIT_KEYS = {
    "position",
    "event_id",
    "stream_id",
    "version",
    "type",
    "recorded_at",
    "actor",
    "correlation_id",
    "causation_id",
    "data",
}


@pytest.fixture
async def api(pg_pool: asyncpg.Pool) -> AsyncIterator[ApiEnv]:
    async with api_env(pg_pool) as env:
        yield env


async def test_global_log_pages_in_position_order(api: ApiEnv) -> None:
    for _ in range(3):
        await api.submit()
    everything = (await api.client.get("/api/v1/events?limit=1000", headers=api.auth("viewer"))).json()
    items = everything["items"]
    positions = [e["position"] for e in items]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert all(set(e) >= AUDIT_KEYS for e in items)
    assert [e["type"] for e in items].count("pipeline.submitted") == 3
    assert [e["type"] for e in items].count("token.created") == 3
    assert everything["next"] is None

    page = (await api.client.get("/api/v1/events?limit=2", headers=api.auth("viewer"))).json()
    assert [e["position"] for e in page["items"]] == positions[:2] and page["next"] == positions[1]
    rest = (await api.client.get(f"/api/v1/events?after={page['next']}", headers=api.auth("viewer"))).json()
    assert [e["position"] for e in rest["items"]] == positions[2:]
    bad = await api.client.get("/api/v1/events?after=-1", headers=api.auth("viewer"))
    assert bad.status_code == 400


async def test_events_cannot_be_changed_or_deleted(api: ApiEnv, pg_pool: asyncpg.Pool) -> None:
    for method in ("PUT", "PATCH", "DELETE"):
        response = await api.client.request(method, "/api/v1/events", headers=api.auth("admin"))
        assert response.status_code == 405
    schema = (await api.client.get("/schema", headers=api.auth())).json()
    for path, operations in schema["paths"].items():
        if "events" in path:
            assert set(operations) <= {"get", "parameters"}, path
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await pg_pool.execute("DELETE FROM events")


async def read_sse(lines: AsyncIterator[str], count: int) -> list[dict[str, Any]]:
    """The next `count` events of an SSE response's lines (comments skipped), as {id, event, data}."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async for line in lines:
        if line.startswith(":") or line.startswith("retry:"):
            continue
        if line == "":
            if "data" in current:
                events.append(current)
                if len(events) == count:
                    return events
            current = {}
            continue
        key, _, value = line.partition(": ")
        current[key] = json.loads(value) if key == "data" else value
    return events


async def test_follow_streams_old_and_new_events_and_resumes_after_last_event_id(api: ApiEnv) -> None:
    pid = (await api.submit())["id"]
    head = (await api.client.get("/api/v1/events?limit=1000", headers=api.auth())).json()["items"][-1]["position"]
    listener = asyncio.create_task(api.ctx.listener.run(stop := asyncio.Event()))
    try:
        async with served(api.app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            headers = api.auth("viewer")
            async with client.stream("GET", "/api/v1/events?follow=true", headers=headers) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                lines = response.aiter_lines()
                backlog = await asyncio.wait_for(read_sse(lines, 4), 10)  # 3 tokens + the submission
                assert [int(e["id"]) for e in backlog] == list(range(1, head + 1))
                assert backlog[-1]["event"] == "pipeline.submitted" and set(backlog[-1]["data"]) >= AUDIT_KEYS
                await api.scheduler(
                    pid, StagePlaced(pipeline_id=pid, stage="prep", attempt="a1", attempt_number=1, agent="g")
                )
                (live,) = await asyncio.wait_for(read_sse(lines, 1), 10)
                assert live["event"] == "stage.placed" and int(live["id"]) == head + 1
                assert live["data"]["data"]["attempt"] == "a1"

            await api.scheduler(
                pid, StagePlaced(pipeline_id=pid, stage="train", attempt="a2", attempt_number=1, agent="g")
            )
            resume = headers | {"Accept": "text/event-stream", "Last-Event-ID": str(head + 1)}
            async with client.stream("GET", "/api/v1/events", headers=resume) as response:
                (missed,) = await asyncio.wait_for(read_sse(response.aiter_lines(), 1), 10)
                assert int(missed["id"]) == head + 2 and missed["data"]["data"]["stage"] == "train"
            bad = await client.get("/api/v1/events?follow=true", headers=headers | {"Last-Event-ID": "x"})
            assert bad.status_code == 400
    finally:
        stop.set()
        await asyncio.wait_for(listener, 10)
