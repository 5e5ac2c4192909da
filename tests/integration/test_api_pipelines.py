"""Integration: pipeline routes on a real Postgres (submit, idempotency, list, get, cancel, retry, audit)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from tests.integration.api_app import SPEC_JSON, SPEC_YAML, ApiEnv, api_env
from verlyard_shared.events import (
    AttemptAccepted,
    AttemptStarted,
    CheckpointSaved,
    PipelineCancelled,
    PipelineFailed,
    PipelineSucceeded,
    StageCancelled,
    StageFailed,
    StagePending,
    StagePlaced,
    StageSkipped,
    StageSucceeded,
)

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
PIPELINE_KEYS = {"id", "name", "status", "created_at", "finished_at", "stages"}
STAGE_KEYS = {"status", "kind", "needs", "pending_reason", "outputs", "attempts"}
ATTEMPT_KEYS = {
    "id",
    "agent",
    "status",
    "started_at",
    "finished_at",
    "exit_code",
    "failure_class",
    "resumed_from_step",
}


@pytest.fixture
async def api(pg_pool: asyncpg.Pool) -> AsyncIterator[ApiEnv]:
    async with api_env(pg_pool) as env:
        yield env


async def run_to_end(api: ApiEnv, pid: str, *, fail: str | None = None) -> None:
    """Play the scheduler: place and finish every stage (failing `fail`, skipping what needs it), then end."""
    order = ("prep", "train", "eval")
    for stage in order:
        if fail is not None and order.index(stage) > order.index(fail):
            await api.scheduler(pid, StageSkipped(pipeline_id=pid, stage=stage, reason=f"{fail} failed"))
            continue
        attempt = f"{pid}-{stage}-1"
        await api.scheduler(
            pid, StagePlaced(pipeline_id=pid, stage=stage, attempt=attempt, attempt_number=1, agent="gpu-1")
        )
        if stage == fail:
            await api.scheduler(
                pid, StageFailed(pipeline_id=pid, stage=stage, attempt=attempt, failure_class="user", exit_code=1)
            )
        else:
            await api.scheduler(pid, StageSucceeded(pipeline_id=pid, stage=stage, attempt=attempt))
    if fail is None:
        await api.scheduler(pid, PipelineSucceeded(pipeline_id=pid))
    else:
        await api.scheduler(pid, PipelineFailed(pipeline_id=pid, reason=f"{fail} failed", failed_stages=(fail,)))


# ---- submit ----------------------------------------------------------------------------------------------


async def test_submit_yaml_returns_201_with_the_full_shape_and_records_actor_and_correlation(api: ApiEnv) -> None:
    response = await api.client.post(
        "/api/v1/pipelines",
        content=SPEC_YAML,
        headers=api.auth("member") | {"Content-Type": "application/yaml", "X-Request-Id": "req-submit-1"},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body.keys() >= PIPELINE_KEYS
    assert body["status"] == "pending" and body["name"] == "sales-sft" and body["finished_at"] is None
    assert response.headers["location"] == f"/api/v1/pipelines/{body['id']}"
    assert response.headers["x-request-id"] == "req-submit-1"
    assert list(body["stages"]) == ["prep", "train", "eval"]
    for stage in body["stages"].values():
        assert stage.keys() >= STAGE_KEYS and stage["status"] == "pending" and stage["attempts"] == []
    assert body["stages"]["train"]["needs"] == ["prep"] and body["stages"]["train"]["kind"] == "noop"
    assert body["labels"] == {"team": "nlp"} and body["submitted_by"] == f"token:{api.ids['member']}:member"

    events = (await api.client.get(f"/api/v1/pipelines/{body['id']}/events", headers=api.auth("viewer"))).json()
    (submitted,) = events["items"]
    assert set(submitted) >= AUDIT_KEYS
    assert submitted["type"] == "pipeline.submitted" and submitted["version"] == 1
    assert submitted["actor"] == f"token:{api.ids['member']}:member"
    assert submitted["correlation_id"] == "req-submit-1"
    assert submitted["data"]["body_sha256"] and submitted["data"]["spec"]["name"] == "sales-sft"

    again = await api.client.get(f"/api/v1/pipelines/{body['id']}", headers=api.auth("viewer"))
    assert again.status_code == 200 and again.json()["id"] == body["id"]


async def test_submit_json(api: ApiEnv) -> None:
    body = await api.submit(SPEC_JSON)
    assert body["name"] == "tiny" and list(body["stages"]) == ["a", "b"]
    assert body["spec"]["stages"]["a"]["params"] == {"sleep_ms": 1}


async def test_idempotency_key_same_body_returns_200_and_the_same_pipeline(api: ApiEnv) -> None:
    first = await api.submit(key="order-42")
    headers = api.auth("member") | {"Idempotency-Key": "order-42", "Content-Type": "application/yaml"}
    again = await api.client.post("/api/v1/pipelines", content=SPEC_YAML, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    assert first["idempotency_key"] == "order-42"
    events = (await api.client.get(f"/api/v1/pipelines/{first['id']}/events", headers=api.auth())).json()
    assert len(events["items"]) == 1  # nothing appended twice

    other = await api.client.post(
        "/api/v1/pipelines", content=SPEC_YAML.replace("sales-sft", "other-name"), headers=headers
    )
    assert other.status_code == 409
    assert other.json()["error"] == "idempotency_conflict" and other.json()["pipeline_id"] == first["id"]

    # Keys are scoped per token: the admin's "order-42" is another pipeline.
    theirs = await api.submit(who="admin", key="order-42")
    assert theirs["id"] != first["id"]


async def test_concurrent_submissions_with_one_key_make_one_pipeline(api: ApiEnv) -> None:
    import asyncio

    headers = api.auth("member") | {"Idempotency-Key": "race-1", "Content-Type": "application/yaml"}
    responses = await asyncio.gather(
        *(api.client.post("/api/v1/pipelines", content=SPEC_YAML, headers=headers) for _ in range(6))
    )
    assert sorted(r.status_code for r in responses) == [200] * 5 + [201]
    assert len({r.json()["id"] for r in responses}) == 1


# ---- list --------------------------------------------------------------------------------------------------


async def test_list_filters_limits_and_pages_with_an_opaque_cursor(api: ApiEnv) -> None:
    ids = [(await api.submit(SPEC_JSON))["id"] for _ in range(5)]
    await api.scheduler(ids[1], StagePlaced(pipeline_id=ids[1], stage="a", attempt="x", attempt_number=1, agent="g"))
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(3):
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await api.client.get("/api/v1/pipelines", params=params, headers=api.auth("viewer"))).json()
        assert set(page) == {"items", "next"}
        seen += [item["id"] for item in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, each once
    item = (await api.client.get("/api/v1/pipelines", headers=api.auth("viewer"))).json()["items"][0]
    assert item["stage_statuses"] == {"a": "pending", "b": "pending"} and item["submitted_by"].startswith("token:")

    running = (await api.client.get("/api/v1/pipelines?status=running", headers=api.auth("viewer"))).json()
    assert [i["id"] for i in running["items"]] == [ids[1]] and running["next"] is None
    both = (await api.client.get("/api/v1/pipelines?status=running,pending", headers=api.auth())).json()
    assert len(both["items"]) == 5


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=abc", "limit"),
        ("status=done", "status"),
        ("cursor=!!", "cursor"),
    ],
)
async def test_list_rejects_bad_parameters_naming_them(api: ApiEnv, query: str, field: str) -> None:
    response = await api.client.get(f"/api/v1/pipelines?{query}", headers=api.auth("viewer"))
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] in ("invalid_request", "invalid_cursor")
    assert field in body["detail"] or any(i["path"] == field for i in body.get("issues", []))


# ---- get ---------------------------------------------------------------------------------------------------


async def test_get_shows_attempts_agents_timings_outputs_and_pending_reasons(api: ApiEnv) -> None:
    pid = (await api.submit())["id"]
    await api.scheduler(pid, StagePending(pipeline_id=pid, stage="prep", reason="no agent has 1 free GPU"))
    body = (await api.client.get(f"/api/v1/pipelines/{pid}", headers=api.auth("viewer"))).json()
    assert body["stages"]["prep"]["pending_reason"] == "no agent has 1 free GPU"
    await api.scheduler(
        pid,
        StagePlaced(
            pipeline_id=pid, stage="prep", attempt="a1", attempt_number=1, agent="gpu-1", resume_from_step=None
        ),
        AttemptAccepted(pipeline_id=pid, stage="prep", attempt="a1", agent="gpu-1"),
        AttemptStarted(pipeline_id=pid, stage="prep", attempt="a1", agent="gpu-1"),
        CheckpointSaved(pipeline_id=pid, stage="prep", attempt="a1", step=10, path="/ck/10"),
        StageSucceeded(pipeline_id=pid, stage="prep", attempt="a1", outputs={"dataset": "/d"}, exit_code=0),
        StagePlaced(pipeline_id=pid, stage="train", attempt="a2", attempt_number=1, agent="gpu-2"),
        StageFailed(pipeline_id=pid, stage="train", attempt="a2", failure_class="oom", exit_code=137),
    )
    body = (await api.client.get(f"/api/v1/pipelines/{pid}", headers=api.auth("viewer"))).json()
    assert body["status"] == "running"
    prep = body["stages"]["prep"]
    assert prep["status"] == "succeeded" and prep["outputs"] == {"dataset": "/d"} and prep["pending_reason"] is None
    assert prep["checkpoint"] == {"step": 10, "path": "/ck/10"}
    (attempt,) = prep["attempts"]
    assert attempt.keys() >= ATTEMPT_KEYS
    assert attempt["agent"] == "gpu-1" and attempt["status"] == "succeeded" and attempt["exit_code"] == 0
    started = datetime.fromisoformat(attempt["started_at"])
    finished = datetime.fromisoformat(attempt["finished_at"])
    assert started.tzinfo is not None and started <= finished <= datetime.now(UTC)
    (failed,) = body["stages"]["train"]["attempts"]
    assert failed["failure_class"] == "oom" and failed["exit_code"] == 137 and failed["status"] == "failed"


async def test_get_unknown_pipeline_is_404_with_the_error_shape(api: ApiEnv) -> None:
    response = await api.client.get("/api/v1/pipelines/nope", headers=api.auth("viewer"))
    assert response.status_code == 404
    assert response.json()["error"] == "not_found" and "nope" in response.json()["detail"]
    events = await api.client.get("/api/v1/pipelines/nope/events", headers=api.auth("viewer"))
    assert events.status_code == 404


# ---- cancel and retry --------------------------------------------------------------------------------------


async def test_cancel_records_the_request_once_and_refuses_a_finished_pipeline(api: ApiEnv) -> None:
    pid = (await api.submit())["id"]
    response = await api.client.post(
        f"/api/v1/pipelines/{pid}/cancel", json={"reason": "wrong data"}, headers=api.auth("member")
    )
    assert response.status_code == 202, response.text
    assert response.json()["cancel_requested"] is True and response.json()["status"] == "pending"
    again = await api.client.post(f"/api/v1/pipelines/{pid}/cancel", headers=api.auth("member"))
    assert again.status_code == 202
    events = (await api.client.get(f"/api/v1/pipelines/{pid}/events", headers=api.auth())).json()["items"]
    cancels = [e for e in events if e["type"] == "pipeline.cancel_requested"]
    assert len(cancels) == 1
    assert cancels[0]["data"]["reason"] == "wrong data" and cancels[0]["actor"].endswith(":member")

    for stage in ("prep", "train", "eval"):
        await api.scheduler(pid, StageCancelled(pipeline_id=pid, stage=stage, reason="wrong data"))
    await api.scheduler(pid, PipelineCancelled(pipeline_id=pid, reason="wrong data"))
    finished = await api.client.post(f"/api/v1/pipelines/{pid}/cancel", headers=api.auth("member"))
    assert finished.status_code == 409
    assert finished.json()["error"] == "pipeline_finished" and "already finished" in finished.json()["detail"]


async def test_cancel_and_retry_unknown_pipeline_is_404(api: ApiEnv) -> None:
    for action in ("cancel", "retry"):
        response = await api.client.post(f"/api/v1/pipelines/missing/{action}", headers=api.auth("member"))
        assert response.status_code == 404, response.text


async def test_members_manage_only_their_own_pipelines_admins_all_viewers_none(api: ApiEnv) -> None:
    await api.add_token("member2", "member")
    pid = (await api.submit(who="member"))["id"]
    other = await api.client.post(f"/api/v1/pipelines/{pid}/cancel", headers=api.auth("member2"))
    assert other.status_code == 403 and other.json()["error"] == "forbidden"
    viewer = await api.client.post(f"/api/v1/pipelines/{pid}/cancel", headers=api.auth("viewer"))
    assert viewer.status_code == 403
    admin = await api.client.post(f"/api/v1/pipelines/{pid}/cancel", headers=api.auth("admin"))
    assert admin.status_code == 202


async def test_retry_reruns_failed_and_skipped_stages_keeping_succeeded_ones(api: ApiEnv) -> None:
    pid = (await api.submit())["id"]
    early = await api.client.post(f"/api/v1/pipelines/{pid}/retry", headers=api.auth("member"))
    assert early.status_code == 409 and early.json()["error"] == "pipeline_active"
    await run_to_end(api, pid, fail="train")
    body = (await api.client.get(f"/api/v1/pipelines/{pid}", headers=api.auth())).json()
    assert body["status"] == "failed"
    assert {n: s["status"] for n, s in body["stages"].items()} == {
        "prep": "succeeded",
        "train": "failed",
        "eval": "skipped",
    }
    bad = await api.client.post(
        f"/api/v1/pipelines/{pid}/retry", json={"stages": ["trian"]}, headers=api.auth("member")
    )
    assert bad.status_code == 400 and bad.json()["error"] == "unknown_stage"
    response = await api.client.post(f"/api/v1/pipelines/{pid}/retry", headers=api.auth("member"))
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "pending" and body["retries"] == 1 and body["finished_at"] is None
    assert {n: s["status"] for n, s in body["stages"].items()} == {
        "prep": "succeeded",
        "train": "pending",
        "eval": "pending",
    }
    events = (await api.client.get(f"/api/v1/pipelines/{pid}/events", headers=api.auth())).json()["items"]
    assert events[-1]["type"] == "pipeline.retry_requested" and events[-1]["data"]["stages"] == ["train", "eval"]


async def test_retry_of_a_succeeded_pipeline_is_409(api: ApiEnv) -> None:
    pid = (await api.submit())["id"]
    await run_to_end(api, pid)
    response = await api.client.post(f"/api/v1/pipelines/{pid}/retry", headers=api.auth("member"))
    assert response.status_code == 409 and response.json()["error"] == "nothing_to_retry"


# ---- audit -------------------------------------------------------------------------------------------------


async def test_pipeline_events_are_in_order_with_the_audit_shape_and_page(api: ApiEnv) -> None:
    pid = (await api.submit())["id"]
    await run_to_end(api, pid)
    everything = (await api.client.get(f"/api/v1/pipelines/{pid}/events", headers=api.auth("viewer"))).json()
    items = everything["items"]
    assert [e["version"] for e in items] == list(range(1, len(items) + 1))
    assert items[0]["type"] == "pipeline.submitted" and items[-1]["type"] == "pipeline.succeeded"
    assert all(set(e) >= AUDIT_KEYS and e["stream_id"] == f"pipeline-{pid}" for e in items)
    assert everything["next"] is None
    first = (await api.client.get(f"/api/v1/pipelines/{pid}/events?limit=3", headers=api.auth())).json()
    assert [e["version"] for e in first["items"]] == [1, 2, 3] and first["next"] == 3
    rest = (await api.client.get(f"/api/v1/pipelines/{pid}/events?after=3", headers=api.auth())).json()
    assert [e["version"] for e in rest["items"]] == list(range(4, len(items) + 1))
