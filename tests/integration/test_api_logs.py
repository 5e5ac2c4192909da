"""Integration: log lines published on NATS are persisted per attempt (idempotently) and served by offset
pages (latest attempt by default, a substring search), and followed as SSE until the attempt ends,
resumable with Last-Event-ID."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from nats.js import JetStreamContext

from tests.integration.api_app import ApiEnv, api_env, served
from tests.integration.telemetry_kit import (
    count,
    eventually,
    failed_and_retried,
    placed,
    publish_logs,
    telemetry_running,
)
from tests.integration.test_api_events import read_sse
from verlyard_shared.events import StageSucceeded


@pytest.fixture
async def api(pg_pool: asyncpg.Pool) -> AsyncIterator[ApiEnv]:
    async with api_env(pg_pool) as env:
        yield env


def url(pid: str, stage: str = "train") -> str:
    return f"/api/v1/pipelines/{pid}/stages/{stage}/logs"


async def _count_is(api: ApiEnv, pid: str, n: int) -> bool:
    assert api.deps.pool is not None
    return await count(api.deps.pool, "log_lines", pid) == n


async def test_pages_default_to_the_latest_attempt_and_search(api: ApiEnv, js: JetStreamContext) -> None:
    pid = (await api.submit())["id"]
    await api.scheduler(pid, placed(pid, "train", "a1", 1))
    async with telemetry_running(api, js):
        await publish_logs(js, pid, "train", "a1", [(i, f"first try line {i}") for i in range(5)] + [(5, "CUDA OOM")])
        await api.scheduler(pid, *failed_and_retried(pid, "train", "a1", 1), placed(pid, "train", "a2", 2))
        await publish_logs(js, pid, "train", "a2", [(i, f"line {i}") for i in range(250)], batch_id="b2")
        await publish_logs(js, pid, "train", "a2", [(i, f"line {i}") for i in range(250)])  # redelivered
        await eventually(lambda: _count_is(api, pid, 256), what="the lines")

    viewer = api.auth("viewer")
    page = (await api.client.get(url(pid) + "?limit=100", headers=viewer)).json()
    assert page["attempt"] == "a2" and page["number"] == 2 and page["attempt_status"] == "placed"
    assert [line["offset"] for line in page["items"]] == list(range(100)) and page["next"] == 100
    rest = (await api.client.get(url(pid) + f"?offset={page['next']}&limit=1000", headers=viewer)).json()
    assert rest["items"][0]["text"] == "line 100" and len(rest["items"]) == 150 and rest["next"] is None
    old = (await api.client.get(url(pid) + "?attempt=1", headers=viewer)).json()
    assert old["attempt"] == "a1" and old["attempt_status"] == "failed" and len(old["items"]) == 6
    found = (await api.client.get(url(pid) + "?attempt=a1&q=oom", headers=viewer)).json()
    assert [line["text"] for line in found["items"]] == ["CUDA OOM"]
    none = (await api.client.get(url(pid, "eval"), headers=viewer)).json()
    assert none["attempt"] is None and none["items"] == []
    assert (await api.client.get(url(pid))).status_code == 401
    assert (await api.client.get(url(pid) + "?attempt=9", headers=viewer)).status_code == 404
    assert (await api.client.get(url("nope"), headers=viewer)).status_code == 404
    assert (await api.client.get(url(pid) + "?offset=-1", headers=viewer)).status_code == 400
    for role in ("member", "admin"):
        assert (await api.client.get(url(pid), headers=api.auth(role))).status_code == 200


async def test_follow_streams_until_the_attempt_ends_and_resumes(api: ApiEnv, js: JetStreamContext) -> None:
    pid = (await api.submit())["id"]
    await api.scheduler(pid, placed(pid, "train", "a1", 1))
    async with telemetry_running(api, js), served(api.app) as base:
        await publish_logs(js, pid, "train", "a1", [(0, "hello"), (1, "world")])
        await eventually(lambda: _count_is(api, pid, 2), what="the first lines")
        async with httpx.AsyncClient(base_url=base, timeout=15) as client:
            headers = api.auth("viewer")
            async with client.stream("GET", url(pid) + "?follow=true", headers=headers) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                lines = response.aiter_lines()
                first = await asyncio.wait_for(read_sse(lines, 2), 10)
                assert [(e["id"], e["data"]["text"]) for e in first] == [("0", "hello"), ("1", "world")]
                await publish_logs(js, pid, "train", "a1", [(2, "live!")])
                (live,) = await asyncio.wait_for(read_sse(lines, 1), 10)
                assert live["id"] == "2" and live["data"]["text"] == "live!" and live["event"] == "log"
            # Lines written while disconnected, then the attempt ends: a resume gets them, then `end`.
            await publish_logs(js, pid, "train", "a1", [(3, "missed 1"), (4, "missed 2")])
            await api.scheduler(pid, StageSucceeded(pipeline_id=pid, stage="train", attempt="a1"))
            resume = headers | {"Last-Event-ID": "2", "Accept": "text/event-stream"}
            async with client.stream("GET", url(pid), headers=resume) as response:
                rest = await asyncio.wait_for(read_sse(response.aiter_lines(), 3), 15)
            assert [e["data"].get("text") for e in rest[:2]] == ["missed 1", "missed 2"]
            assert (
                rest[2]["event"] == "end" and rest[2]["data"]["status"] == "succeeded" and rest[2]["data"]["next"] == 5
            )
            bad = await client.get(url(pid) + "?follow=true", headers=headers | {"Last-Event-ID": "x"})
            assert bad.status_code == 400
