"""Integration: agents as the API shows them (a fold of agent.* events, live heartbeats from NATS, current
attempts), drain (admin) appending agent.drain_requested, and /metrics (Prometheus text, token needed)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from tests.integration.api_app import ApiEnv, api_env
from tests.integration.telemetry_kit import eventually, placed
from verlyard_shared import codec, subjects
from verlyard_shared.envelope import Metadata, NewEvent
from verlyard_shared.events import AgentLost, AgentRegistered, AnyEvent, GpuInfo
from verlyard_shared.ids import agent_stream, new_id
from verlyard_shared.reports import AgentHeartbeat, GpuStatus
from verlyard_shared.store.port import ANY

GPUS = (
    GpuInfo(index=0, name="NVIDIA H100", uuid="GPU-a", memory_total_mb=81_559),
    GpuInfo(index=1, name="NVIDIA H100"),
)


@pytest.fixture
async def api(pg_pool: asyncpg.Pool) -> AsyncIterator[ApiEnv]:
    async with api_env(pg_pool) as env:
        yield env


async def record(api: ApiEnv, agent: str, *events: AnyEvent) -> None:
    await api.ctx.store.append(
        agent_stream(agent),
        ANY,
        [NewEvent(event_id=new_id(), event=e) for e in events],
        Metadata(actor="scheduler", correlation_id=new_id()),
    )


async def registered_agents(api: ApiEnv) -> None:
    await record(api, "g1", AgentRegistered(agent="g1", hostname="gpu-1", gpus=GPUS, cpu_slots=8, labels={"zone": "a"}))
    await record(api, "g2", AgentRegistered(agent="g2", hostname="gpu-2", gpus=GPUS[:1]))
    await record(api, "g2", AgentLost(agent="g2", reason="no heartbeat for 30s"))


async def test_agents_show_inventory_state_attempts_and_live_utilisation(api: ApiEnv, nc: NATS) -> None:
    await registered_agents(api)
    pid = (await api.submit())["id"]
    await api.scheduler(pid, placed(pid, "prep", "a1", 1, agent="g1"))
    live = api.deps.services.live_agents
    await live.start(nc)
    try:
        beat = AgentHeartbeat(
            report_id=new_id(),
            agent="g1",
            sent_at=datetime.now(UTC),
            running_attempts=("a1",),
            gpus=(GpuStatus(index=0, utilization_pct=93.0, memory_used_mb=40_000, temperature_c=61.0),),
        )
        await nc.publish(subjects.report_subject("g1", "heartbeat"), codec.encode(beat))
        await nc.publish(subjects.report_subject("g1", "heartbeat"), b"garbage")  # ignored

        async def seen() -> bool:
            return "g1" in live.heartbeats

        await eventually(seen, what="the heartbeat")
    finally:
        await live.stop()

    body = (await api.client.get("/api/v1/agents", headers=api.auth("viewer"))).json()
    assert body["next"] is None
    g1, g2 = body["items"]
    assert (g1["id"], g1["hostname"], g1["state"], g1["cpu_slots"], g1["labels"]) == (
        "g1",
        "gpu-1",
        "active",
        8,
        {"zone": "a"},
    )
    assert [(g["index"], g["name"], g["memory_total_mb"], g["utilization_pct"]) for g in g1["gpus"]] == [
        (0, "NVIDIA H100", 81_559, 93.0),
        (1, "NVIDIA H100", 0, None),
    ]
    assert g1["last_heartbeat_at"] is not None and g1["reported_draining"] is False
    assert [(a["pipeline_id"], a["stage"], a["attempt"], a["status"]) for a in g1["attempts"]] == [
        (pid, "prep", "a1", "placed")
    ]
    assert (g2["state"], g2["reason"], g2["attempts"], g2["last_heartbeat_at"]) == (
        "lost",
        "no heartbeat for 30s",
        [],
        None,
    )
    one = (await api.client.get("/api/v1/agents/g1", headers=api.auth("viewer"))).json()
    assert one["id"] == "g1" and one["gpus"][0]["temperature_c"] == 61.0
    assert (await api.client.get("/api/v1/agents/nope", headers=api.auth("viewer"))).status_code == 404
    assert (await api.client.get("/api/v1/agents")).status_code == 401


async def test_drain_is_admin_only_appends_once_and_refuses_inactive_agents(api: ApiEnv) -> None:
    await registered_agents(api)
    for role in ("viewer", "member"):
        denied = await api.client.post("/api/v1/agents/g1/drain", headers=api.auth(role))
        assert denied.status_code == 403 and denied.json()["error"] == "forbidden"
    assert (await api.client.post("/api/v1/agents/g1/drain")).status_code == 401
    drained = await api.client.post("/api/v1/agents/g1/drain", json={"reason": "kernel update"}, headers=api.auth())
    assert drained.status_code == 202, drained.text
    assert drained.json()["state"] == "draining" and drained.json()["reason"] == "kernel update"
    again = await api.client.post("/api/v1/agents/g1/drain", headers=api.auth())
    assert again.status_code == 202
    events = await api.ctx.store.read_stream(agent_stream("g1"))
    drains = [e for e in events if codec.to_public(e)["type"] == "agent.drain_requested"]
    assert len(drains) == 1 and drains[0].actor == f"token:{api.ids['admin']}:admin"
    assert codec.to_public(drains[0])["data"] == {"agent": "g1", "reason": "kernel update"}
    assert (await api.client.post("/api/v1/agents/nope/drain", headers=api.auth())).status_code == 404
    lost = await api.client.post("/api/v1/agents/g2/drain", headers=api.auth())
    assert lost.status_code == 409 and lost.json()["error"] == "agent_not_active"
    bad = await api.client.post("/api/v1/agents/g1/drain", json={"nope": 1}, headers=api.auth())
    assert bad.status_code == 400


async def test_prometheus_metrics_need_a_token_and_count(api: ApiEnv) -> None:
    await registered_agents(api)
    await api.submit()
    assert (await api.client.get("/metrics")).status_code == 401
    await api.client.get("/api/v1/agents", headers=api.auth("viewer"))
    api.deps.services.relay_lag = lambda: type(
        "Lag", (), {"leader": True, "behind": 3, "position": 7, "last_latency_s": 0.004}
    )()
    response = await api.client.get("/metrics", headers=api.auth("viewer"))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'verlyard_pipelines{status="pending"} 1' in text
    assert 'verlyard_agents{state="active"} 1' in text and 'verlyard_agents{state="lost"} 1' in text
    assert 'verlyard_api_requests_total{method="GET",route="/api/v1/agents",status="200"} 1' in text
    assert 'verlyard_api_requests_total{method="GET",route="/metrics",status="401"} 1' in text
    assert "verlyard_api_request_duration_seconds_bucket" in text and "verlyard_relay_behind_events 3" in text
    head = int(await api.ctx.store.head_position())
    assert f"verlyard_events_appended_total {head}" in text
