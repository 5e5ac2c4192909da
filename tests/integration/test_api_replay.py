"""Integration: the projector (background task, tracking in the same transaction, concurrent projectors)
and `replay --verify` / rebuild, which detect and repair a corrupted read model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.integration.api_app import ApiEnv, api_env, served
from tests.integration.test_api_pipelines import run_to_end
from verlyard_api.adapters.pg_projector import CONSUMER, PgProjector
from verlyard_shared import cli
from verlyard_shared.envelope import Metadata, NewEvent
from verlyard_shared.events import StagePlaced
from verlyard_shared.ids import new_id, pipeline_stream
from verlyard_shared.store.port import ANY


@pytest.fixture
async def api(pg_pool: asyncpg.Pool) -> AsyncIterator[ApiEnv]:
    async with api_env(pg_pool) as env:
        yield env


async def verify(api: ApiEnv) -> dict[str, object]:
    response = await api.client.post("/api/v1/admin/replay?verify=true", headers=api.auth("admin"))
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


async def test_verify_is_clean_then_reports_a_corrupted_row_then_rebuild_repairs_it(
    api: ApiEnv, pg_pool: asyncpg.Pool
) -> None:
    done = (await api.submit())["id"]
    await run_to_end(api, done, fail="train")
    pending = (await api.submit())["id"]
    clean = await verify(api)
    assert clean["ok"] is True and clean["differences"] == [] and clean["mode"] == "verify"
    assert clean["pipelines"] == 2 and clean["tokens"] == 3

    await pg_pool.execute("UPDATE stages SET status = 'succeeded' WHERE pipeline_id = $1 AND name = 'train'", done)
    await pg_pool.execute("UPDATE attempts SET agent = 'elsewhere' WHERE pipeline_id = $1 AND stage = 'prep'", done)
    await pg_pool.execute("DELETE FROM pipelines WHERE id = $1", pending)
    await pg_pool.execute("UPDATE tokens SET role = 'admin' WHERE name = 'viewer'")
    report = await verify(api)
    assert report["ok"] is False
    found = {(d["kind"], d["id"], d["field"]): (d["expected"], d["found"]) for d in report["differences"]}  # type: ignore[union-attr, index]
    assert found[("pipeline", done, "stages.train.status")] == ("failed", "succeeded")
    assert found[("pipeline", done, "stages.prep.attempts[0].agent")] == ("gpu-1", "elsewhere")
    assert found[("token", api.ids["viewer"], "role")] == ("viewer", "admin")
    # The pipeline row is gone but its stage rows remain: the whole view is reported missing.
    assert any(k[1] == pending for k in found)

    rebuilt = await api.client.post("/api/v1/admin/replay", headers=api.auth("admin"))
    assert rebuilt.status_code == 200 and rebuilt.json()["mode"] == "rebuild"
    assert (await verify(api))["ok"] is True
    body = (await api.client.get(f"/api/v1/pipelines/{pending}", headers=api.auth())).json()
    assert body["status"] == "pending"
    # Tokens still authenticate after a rebuild (their secrets' hashes are not a projection).
    assert (await api.client.get("/api/v1/pipelines", headers=api.auth("viewer"))).status_code == 200


async def test_cli_replay_verify(
    api: ApiEnv, pg_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pid = (await api.submit())["id"]
    async with served(api.app) as url:
        monkeypatch.setenv("VERLYARD_API_URL", url)
        monkeypatch.setenv("VERLYARD_TOKEN", api.tokens["admin"])
        assert await asyncio.to_thread(cli.main, ["replay", "--verify"]) == 0
        assert "ok: the read models match the event log" in capsys.readouterr().out
        await pg_pool.execute("UPDATE pipelines SET name = 'renamed' WHERE id = $1", pid)
        assert await asyncio.to_thread(cli.main, ["replay", "--verify"]) == 1
        out = capsys.readouterr().out
        assert f'pipeline {pid} name: expected "sales-sft", found "renamed"' in out
        assert await asyncio.to_thread(cli.main, ["replay"]) == 0
        assert await asyncio.to_thread(cli.main, ["replay", "--verify", "--json"]) == 0
        assert '"ok": true' in capsys.readouterr().out


async def test_background_projector_follows_appends_and_tracks_in_the_same_transaction(
    api: ApiEnv, pg_pool: asyncpg.Pool
) -> None:
    pid = (await api.submit())["id"]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(api.ctx.listener.run(stop)), asyncio.create_task(api.ctx.projector.run(stop))]
    try:
        # The scheduler appends without catching the projector up: the background task must.
        result = await api.ctx.store.append(
            pipeline_stream(pid),
            ANY,
            [
                NewEvent(
                    event_id=new_id(),
                    event=StagePlaced(pipeline_id=pid, stage="prep", attempt="a", attempt_number=1, agent="g"),
                )
            ],
            Metadata(actor="scheduler", correlation_id="c"),
        )
        deadline = time.monotonic() + 5
        status = None
        while time.monotonic() < deadline:
            status = await pg_pool.fetchval("SELECT status FROM pipelines WHERE id = $1", pid)
            if status == "running":
                break
            await asyncio.sleep(0.02)
        assert status == "running"
        tracked = await pg_pool.fetchval("SELECT position FROM tracking WHERE consumer = $1", CONSUMER)
        assert tracked == result.last_position
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def test_concurrent_projectors_apply_each_event_once(api: ApiEnv, pg_pool: asyncpg.Pool) -> None:
    ids = [(await api.submit())["id"] for _ in range(3)]
    for pid in ids:
        await api.ctx.store.append(
            pipeline_stream(pid),
            ANY,
            [
                NewEvent(
                    event_id=new_id(),
                    event=StagePlaced(pipeline_id=pid, stage=s, attempt=f"{pid}-{s}", attempt_number=1, agent="g"),
                )
                for s in ("prep",)
            ],
            Metadata(actor="scheduler", correlation_id="c"),
        )
    projectors = [PgProjector(pg_pool, batch=1) for _ in range(4)]  # as if four API processes
    await asyncio.gather(*(p.catch_up() for p in projectors))
    head = await pg_pool.fetchval("SELECT max(position) FROM events")
    assert await pg_pool.fetchval("SELECT position FROM tracking WHERE consumer = $1", CONSUMER) == head
    assert (await verify(api))["ok"] is True
    assert await pg_pool.fetchval("SELECT count(*) FROM attempts") == 3


async def _place(api: ApiEnv, pid: str, stage: str, attempt: str) -> None:
    await api.ctx.store.append(
        pipeline_stream(pid),
        ANY,
        [
            NewEvent(
                event_id=new_id(),
                event=StagePlaced(pipeline_id=pid, stage=stage, attempt=attempt, attempt_number=1, agent="g"),
            )
        ],
        Metadata(actor="scheduler", correlation_id="c"),
    )


async def test_view_cache_drops_what_another_process_projected(api: ApiEnv, pg_pool: asyncpg.Pool) -> None:
    """Two API processes: B projects a change to a pipeline A has cached; A's next step drops it, so A
    neither answers from nor diffs against the old view (docs/adr/0018-pipeline-view-cache.md)."""
    pid = (await api.submit())["id"]
    a, b = PgProjector(pg_pool), PgProjector(pg_pool)
    await a.catch_up()
    cached = await a.view(pid)
    assert cached is not None and cached.status == "pending"
    assert a.views.peek(pid) is cached  # A's own read was offered and kept

    await _place(api, pid, "prep", f"{pid}-prep")
    await b.catch_up()  # the other process projects the placement
    assert (await b.view(pid)).status == "running"  # type: ignore[union-attr]
    await a.catch_up()  # A sees the tracking row moved past it: it forgets what changed there
    assert a.views.peek(pid) is None
    assert (await a.view(pid)).status == "running"  # type: ignore[union-attr]

    # A projects the next event for that pipeline from the right `before`: the rows stay exact.
    await _place(api, pid, "train", f"{pid}-train")
    await a.catch_up()
    view = a.views.peek(pid)
    assert view is not None and view.stages["train"].status == "running"
    assert (await verify(api))["ok"] is True


async def test_view_cache_refuses_a_read_that_raced_a_projection(api: ApiEnv, pg_pool: asyncpg.Pool) -> None:
    pid = (await api.submit())["id"]
    projector = PgProjector(pg_pool)
    await projector.catch_up()
    stamp = projector.views.stamp()
    old = await api.ctx.projector.view(pid)
    assert old is not None
    await _place(api, pid, "prep", f"{pid}-prep")
    await projector.catch_up()  # commits and puts the newer view
    assert projector.views.offer(old, stamp) is False
    assert projector.views.peek(pid) is not None and projector.views.peek(pid).status == "running"  # type: ignore[union-attr]


async def test_get_answers_the_projected_view_after_a_rebuild(api: ApiEnv, pg_pool: asyncpg.Pool) -> None:
    pid = (await api.submit())["id"]
    assert (await api.client.get(f"/api/v1/pipelines/{pid}", headers=api.auth())).json()["name"] == "sales-sft"
    await pg_pool.execute("UPDATE pipelines SET name = 'renamed' WHERE id = $1", pid)
    rebuilt = await api.client.post("/api/v1/admin/replay", headers=api.auth("admin"))
    assert rebuilt.status_code == 200
    assert api.ctx.projector.views.peek(pid) is None  # cleared with the rebuild
    assert (await api.client.get(f"/api/v1/pipelines/{pid}", headers=api.auth())).json()["name"] == "sales-sft"


async def test_a_rebuild_in_another_process_clears_this_cache(api: ApiEnv, pg_pool: asyncpg.Pool) -> None:
    pid = (await api.submit())["id"]
    a, b = PgProjector(pg_pool), PgProjector(pg_pool)
    await a.catch_up()
    await pg_pool.execute("UPDATE pipelines SET name = 'renamed' WHERE id = $1", pid)  # a corrupted row
    assert (await a.view(pid)).name == "renamed"  # type: ignore[union-attr]  # read and cached as stored
    await b.rebuild()  # repairs every row; no new event, so the tracking position does not move
    await _place(api, pid, "prep", f"{pid}-prep")
    await a.catch_up()  # sees the rebuild count move: nothing it cached holds
    view = await a.view(pid)
    assert view is not None and view.name == "sales-sft" and view.status == "running"
    assert (await verify(api))["ok"] is True
