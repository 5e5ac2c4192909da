"""Integration: the API service as `verlyard api` runs it (uvicorn, migrations, first-start admin token,
projector and listener tasks, relay), on real Postgres and NATS."""

from __future__ import annotations

import asyncio
import stat
import time
from pathlib import Path

import httpx
import pytest

from verlyard_api import app as api_app
from verlyard_shared.embedded.ports import free_port
from verlyard_shared.envelope import Metadata, NewEvent
from verlyard_shared.events import StagePlaced
from verlyard_shared.ids import pipeline_stream
from verlyard_shared.settings import Settings
from verlyard_shared.store.port import ANY
from verlyard_shared.store.postgres import PostgresEventStore, connect_pool


async def poll(what: str, check: object, *, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_service_bootstraps_a_token_serves_and_projects_in_the_background(
    pg_url: str, nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stops: list[asyncio.Event] = []
    monkeypatch.setattr(api_app, "stop_on_signals", stops.append)
    monkeypatch.setenv("VERLYARD_HOME", str(tmp_path))
    port = free_port()
    settings = Settings(home=tmp_path, database_url=pg_url, nats_url=nats_url, api_port=port)
    service = asyncio.create_task(api_app.serve(settings))
    token_file = tmp_path / "admin-token"
    try:
        await poll("the admin token", lambda: asyncio.sleep(0, token_file.exists()))
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            async def ready() -> bool:
                try:
                    return (await client.get("/readyz", headers=headers)).status_code == 200
                except httpx.TransportError:
                    return False

            await poll("readiness", ready)
            assert (await client.get("/readyz")).status_code == 401
            submitted = await client.post(
                "/api/v1/pipelines",
                json={"name": "svc", "stages": {"a": {"kind": "noop"}}},
                headers=headers,
            )
            assert submitted.status_code == 201, submitted.text
            pid = submitted.json()["id"]

            # Another service appends; the background projector (woken by NOTIFY) updates the read model.
            pool = await connect_pool(pg_url, min_size=1, max_size=1)
            try:
                await PostgresEventStore(pool).append(
                    pipeline_stream(pid),
                    ANY,
                    [
                        NewEvent(
                            event_id="placed-1",
                            event=StagePlaced(pipeline_id=pid, stage="a", attempt="x", attempt_number=1, agent="g"),
                        )
                    ],
                    Metadata(actor="scheduler", correlation_id="c"),
                )
            finally:
                await pool.close()

            async def running() -> bool:
                body = (await client.get(f"/api/v1/pipelines/{pid}", headers=headers)).json()
                return bool(body["status"] == "running")

            await poll("the projector", running, timeout=5)
    finally:
        assert stops, "serve() installs its stop event"
        stops[0].set()
        await asyncio.wait_for(service, 30)
    # A restart keeps the first token (no second bootstrap).
    first = token_file.read_text()
    service = asyncio.create_task(api_app.serve(settings))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            async def serving() -> bool:
                try:
                    response = await client.get(
                        "/api/v1/pipelines", headers={"Authorization": f"Bearer {first.strip()}"}
                    )
                except httpx.TransportError:
                    return False
                return response.status_code == 200

            await poll("the restarted service", serving)
        assert token_file.read_text() == first
    finally:
        stops[-1].set()
        await asyncio.wait_for(service, 30)
