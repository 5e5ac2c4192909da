"""Integration: one JSON error shape everywhere: 400/413/415/422 for bad input (naming stage, field and line),
404/405, 500 without a stack trace, and 503 + Retry-After within 5 s when Postgres is down (T14)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from tests.integration.api_app import SPEC_YAML, ApiEnv, api_env
from verlyard_api.app import ApiDeps, create_app
from verlyard_shared.embedded.ports import free_port
from verlyard_shared.embedded.postgres import EmbeddedPostgres
from verlyard_shared.store.postgres import connect_pool


@pytest.fixture
async def api(pg_pool: asyncpg.Pool) -> AsyncIterator[ApiEnv]:
    async with api_env(pg_pool) as env:
        yield env


def yaml_headers(api: ApiEnv) -> dict[str, str]:
    return api.auth("member") | {"Content-Type": "application/yaml"}


async def test_spec_errors_are_422_naming_stage_field_and_line(api: ApiEnv) -> None:
    bad = SPEC_YAML.replace("needs: [train]", "needs: [trian]").replace(
        "  train:\n    kind: noop", "  train:\n    kind: tran"
    )
    response = await api.client.post("/api/v1/pipelines", content=bad, headers=yaml_headers(api))
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_spec" and body["detail"]
    issues = {i["path"]: i for i in body["issues"]}
    assert set(issues) == {"stages.train.kind", "stages.eval.needs[0]"}
    assert issues["stages.train.kind"]["line"] == 7 and "tran" in issues["stages.train.kind"]["message"]
    assert (
        issues["stages.eval.needs[0]"]["line"] == 11
        and "did you mean 'train'" in issues["stages.eval.needs[0]"]["message"]
    )
    assert all(set(i) == {"path", "message", "line"} for i in body["issues"])


async def test_json_spec_errors_name_the_field(api: ApiEnv) -> None:
    response = await api.client.post(
        "/api/v1/pipelines", json={"name": "Bad Name", "stages": {"a": {"kind": "noop"}}}, headers=api.auth("member")
    )
    assert response.status_code == 422
    (issue,) = response.json()["issues"]
    assert issue["path"] == "name" and issue["line"] is None


@pytest.mark.parametrize(
    ("content", "content_type"),
    [("{not json", "application/json"), ("name: [unclosed\n", "application/yaml"), ("", "application/yaml")],
)
async def test_unparsable_bodies_are_400(api: ApiEnv, content: str, content_type: str) -> None:
    response = await api.client.post(
        "/api/v1/pipelines", content=content, headers=api.auth("member") | {"Content-Type": content_type}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_body" and response.json()["issues"]


async def test_yaml_syntax_error_names_the_line(api: ApiEnv) -> None:
    response = await api.client.post(
        "/api/v1/pipelines", content="name: x\nstages:\n  a: [\n", headers=yaml_headers(api)
    )
    assert response.status_code == 400
    assert response.json()["issues"][0]["line"] is not None


async def test_other_media_types_are_415(api: ApiEnv) -> None:
    response = await api.client.post(
        "/api/v1/pipelines", content="a=b", headers=api.auth("member") | {"Content-Type": "text/csv"}
    )
    assert response.status_code == 415 and response.json()["error"] == "unsupported_media_type"


async def test_bodies_over_one_mib_are_413(api: ApiEnv) -> None:
    big = SPEC_YAML + "# " + "x" * (1024 * 1024) + "\n"
    response = await api.client.post("/api/v1/pipelines", content=big, headers=yaml_headers(api))
    assert response.status_code == 413 and response.json()["error"] == "too_large"
    tokens = await api.client.post("/api/v1/tokens", content=b"{" + b" " * (1024 * 1024 + 1) + b"}", headers=api.auth())
    assert tokens.status_code == 413


async def test_bad_json_bodies_on_other_routes_are_400(api: ApiEnv) -> None:
    response = await api.client.post(
        "/api/v1/tokens", content="{", headers=api.auth() | {"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"
    response = await api.client.post("/api/v1/tokens", json={"role": "root"}, headers=api.auth())
    assert response.status_code == 400 and "role" in response.json()["detail"]


async def test_unknown_routes_and_methods(api: ApiEnv) -> None:
    missing = await api.client.get("/api/v1/nothing-here", headers=api.auth())
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert missing.headers["x-request-id"]
    method = await api.client.delete("/api/v1/pipelines", headers=api.auth())
    assert method.status_code == 405 and method.json()["error"] == "method_not_allowed"


async def test_request_ids_are_echoed_or_minted(api: ApiEnv) -> None:
    given = await api.client.get("/api/v1/pipelines", headers=api.auth() | {"X-Request-Id": "trace-abc.1"})
    assert given.headers["x-request-id"] == "trace-abc.1"
    minted = await api.client.get("/api/v1/pipelines", headers=api.auth() | {"X-Request-Id": "bad id with spaces"})
    assert minted.headers["x-request-id"] != "bad id with spaces" and len(minted.headers["x-request-id"]) == 36
    unauthenticated = await api.client.get("/api/v1/pipelines")
    assert unauthenticated.headers["x-request-id"]


async def test_unexpected_errors_are_500_with_a_request_id_and_no_trace(
    api: ApiEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(token: str) -> None:
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr(api.ctx.tokens, "authenticate", broken)
    response = await api.client.get("/api/v1/pipelines", headers=api.auth() | {"X-Request-Id": "boom-1"})
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "internal" and body["request_id"] == "boom-1" and "boom-1" in body["detail"]
    assert "secret internals" not in response.text and "Traceback" not in response.text


# ---- Postgres down: 503 + Retry-After, fast --------------------------------------------------------------


async def test_postgres_unreachable_is_503_with_retry_after_on_every_route() -> None:
    # A pool on a port where nothing listens: every database call fails to connect.
    pool = await connect_pool(f"postgresql://u:p@127.0.0.1:{free_port()}/x", min_size=0, max_size=2)
    try:
        app = create_app(ApiDeps(pool=pool))
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]  # litestar types its scope more loosely
        token = "vy_" + "A" * 43
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for method, path in [
                ("GET", "/api/v1/pipelines"),
                ("GET", "/api/v1/pipelines/x"),
                ("POST", "/api/v1/pipelines"),
                ("GET", "/api/v1/events"),
                ("POST", "/api/v1/tokens"),
            ]:
                started = time.monotonic()
                response = await client.request(method, path, headers={"Authorization": f"Bearer {token}"})
                assert time.monotonic() - started < 5
                assert response.status_code == 503, (path, response.text)
                assert response.headers["retry-after"] == "1" and response.json()["error"] == "unavailable"
            health = await client.get("/healthz")
            assert health.status_code == 200
    finally:
        pool.terminate()


async def test_postgres_stopped_mid_flight_gives_503_then_recovers(api: ApiEnv, pg_server: EmbeddedPostgres) -> None:
    pid = (await api.submit())["id"]
    await asyncio.to_thread(pg_server.stop_immediate)
    try:
        api.ctx.tokens._cache.clear()  # make the request reach the database
        for path in (f"/api/v1/pipelines/{pid}", "/api/v1/pipelines"):
            started = time.monotonic()
            response = await api.client.get(path, headers=api.auth("viewer"))
            assert time.monotonic() - started < 5
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"]
        started = time.monotonic()
        submit = await api.client.post("/api/v1/pipelines", content=SPEC_YAML, headers=yaml_headers(api))
        assert submit.status_code == 503 and time.monotonic() - started < 5
    finally:
        await asyncio.to_thread(pg_server.start)
    deadline = time.monotonic() + 10
    last: Any = None
    while time.monotonic() < deadline:
        last = await api.client.get(f"/api/v1/pipelines/{pid}", headers=api.auth("viewer"))
        if last.status_code == 200:
            break
        await asyncio.sleep(0.1)
    assert last is not None
    assert last.status_code == 200, last.text
    assert json.loads(last.text)["id"] == pid
