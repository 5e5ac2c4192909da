"""Integration: metrics published on NATS like an agent does are persisted (idempotently, bad messages
terminated) and served per key and attempt, downsampled, with rolled-back steps after a resume marked and
one effective curve."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from nats.js import JetStreamContext

from tests.integration.api_app import ApiEnv, api_env
from tests.integration.telemetry_kit import (
    count,
    eventually,
    failed_and_retried,
    placed,
    publish_metrics,
    telemetry_running,
)
from verlyard_api.adapters.pg_telemetry import store_metrics
from verlyard_api.telemetry import MetricRow
from verlyard_shared import subjects


@pytest.fixture
async def api(pg_pool: asyncpg.Pool) -> AsyncIterator[ApiEnv]:
    async with api_env(pg_pool) as env:
        yield env


def url(pid: str, stage: str = "train") -> str:
    return f"/api/v1/pipelines/{pid}/stages/{stage}/metrics"


async def test_points_across_a_resume_give_one_effective_curve(api: ApiEnv, js: JetStreamContext) -> None:
    pid = (await api.submit())["id"]
    await api.scheduler(pid, placed(pid, "train", "a1", 1))
    async with telemetry_running(api, js) as persisters:
        first = await publish_metrics(js, pid, "train", "a1", [(s, "loss", 10.0 - s / 10) for s in range(1, 81)])
        await publish_metrics(js, pid, "train", "a1", [(s, "lr", 1e-5) for s in range(1, 81)])
        await eventually(lambda: _is(count(api.deps.pool, "metrics", pid), 160), what="a1's points")  # type: ignore[arg-type]
        # The attempt fails; the next one resumes from the checkpoint at step 50.
        await api.scheduler(pid, *failed_and_retried(pid, "train", "a1", 1), placed(pid, "train", "a2", 2, resume=50))
        await publish_metrics(js, pid, "train", "a2", [(s, "loss", 5.0 - s / 100) for s in range(51, 121)])
        # A redelivered batch (same points, a new message id) and a message that is not telemetry at all.
        await publish_metrics(js, pid, "train", "a1", [(s, "loss", 10.0 - s / 10) for s in range(1, 81)])
        await js.publish(subjects.metric_subject(pid, "train"), b"not json", headers={"Nats-Msg-Id": "garbage"})
        await eventually(lambda: _is(count(api.deps.pool, "metrics", pid), 230), what="a2's points")  # type: ignore[arg-type]
        await eventually(lambda: _settled(js), what="every message acked or terminated")
        assert persisters["metric"].stored == 230 and first
        assert api.deps.services.ops.telemetry[("metric", "rejected")] == 1
        assert api.deps.services.ops.telemetry[("metric", "duplicate")] == 80

    body = (await api.client.get(url(pid), headers=api.auth("viewer"))).json()
    assert body["keys"] == ["loss", "lr"]
    assert [(a["id"], a["number"], a["resumed_from_step"], a["rolled_back_from"]) for a in body["attempts"]] == [
        ("a1", 1, None, 51),
        ("a2", 2, 50, None),
    ]
    a1_loss = next(s for s in body["series"] if s["key"] == "loss" and s["attempt"] == "a1")
    assert a1_loss["total_points"] == 80 and not a1_loss["downsampled"]
    assert [p["step"] for p in a1_loss["points"] if p["rolled_back"]] == list(range(51, 81))
    loss = next(e for e in body["effective"] if e["key"] == "loss")
    assert [p["step"] for p in loss["points"]] == list(range(1, 121))
    assert {p["attempt"] for p in loss["points"] if p["step"] > 50} == {2}
    assert loss["points"][60]["value"] == pytest.approx(5.0 - 61 / 100)

    only = (await api.client.get(url(pid) + "?attempt=1&keys=loss", headers=api.auth("viewer"))).json()
    assert only["effective"] is None and [(s["key"], s["attempt"]) for s in only["series"]] == [("loss", "a1")]
    by_id = (await api.client.get(url(pid) + "?attempt=a2", headers=api.auth("viewer"))).json()
    assert {s["attempt"] for s in by_id["series"]} == {"a2"}


async def _is(value: object, expected: int) -> bool:
    return await value == expected  # type: ignore[misc]


async def _settled(js: JetStreamContext) -> bool:
    info = await js.consumer_info(subjects.STREAM_METRICS, subjects.CONSUMER_API_METRICS)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_long_series_are_downsampled_to_max_points(api: ApiEnv, pg_pool: asyncpg.Pool) -> None:
    pid = (await api.submit())["id"]
    await api.scheduler(pid, placed(pid, "train", "a1", 1))
    now = datetime.now(UTC)
    rows = [
        MetricRow(
            pipeline_id=pid, stage="train", attempt="a1", step=s, key="loss", value=1.0 / (s + 1), recorded_at=now
        )
        for s in range(20_000)
    ]
    rows[12_345] = MetricRow(
        pipeline_id=pid, stage="train", attempt="a1", step=12_345, key="loss", value=9.0, recorded_at=now
    )
    rows += [
        MetricRow(pipeline_id=pid, stage="train", attempt="a1", step=s, key="small", value=float(s), recorded_at=now)
        for s in range(300)
    ]
    # A wave ends mid-range: its last point is neither its bucket's lowest nor its highest value.
    rows += [
        MetricRow(
            pipeline_id=pid, stage="train", attempt="a1", step=s, key="wave", value=(s % 10) / 10, recorded_at=now
        )
        for s in range(1, 20_006)
    ]
    assert await store_metrics(pg_pool, rows) == 40_305
    assert await store_metrics(pg_pool, rows[:100]) == 0  # idempotent

    body = (await api.client.get(url(pid) + "?max_points=100", headers=api.auth("viewer"))).json()
    loss = next(s for s in body["series"] if s["key"] == "loss")
    steps = [p["step"] for p in loss["points"]]
    assert len(steps) == 100 and loss["downsampled"] and loss["total_points"] == 20_000
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 19_999
    assert any(p["value"] == 9.0 for p in loss["points"])  # the spike survives (min/max buckets, then LTTB)
    wave = [p["step"] for p in next(s for s in body["series"] if s["key"] == "wave")["points"]]
    assert (wave[0], wave[-1]) == (1, 20_005), "a long series keeps its own first and last step"
    small = next(s for s in body["series"] if s["key"] == "small")  # under 4 x max_points: read whole, then LTTB
    assert len(small["points"]) == 100 and small["total_points"] == 300
    default = (await api.client.get(url(pid) + "?keys=small", headers=api.auth("viewer"))).json()
    assert len(default["series"][0]["points"]) == 300 and not default["series"][0]["downsampled"]


async def test_errors_and_roles(api: ApiEnv) -> None:
    pid = (await api.submit())["id"]
    assert (await api.client.get(url(pid))).status_code == 401
    for role in ("viewer", "member", "admin"):
        assert (await api.client.get(url(pid), headers=api.auth(role))).status_code == 200
    assert (await api.client.get(url("nope"), headers=api.auth("viewer"))).status_code == 404
    assert (await api.client.get(url(pid, "nope"), headers=api.auth("viewer"))).status_code == 404
    missing = await api.client.get(url(pid) + "?attempt=7", headers=api.auth("viewer"))
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    bad = await api.client.get(url(pid) + "?max_points=1", headers=api.auth("viewer"))
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_request"
    empty = (await api.client.get(url(pid), headers=api.auth("viewer"))).json()
    assert empty["series"] == [] and empty["effective"] == [] and empty["attempts"] == []
