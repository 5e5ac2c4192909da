"""Integration: bearer tokens and roles (T11): 401 everywhere but /healthz, 403 by role, token creation
(the secret is never recorded), the first-start admin token, and `verlyard token create`."""

from __future__ import annotations

import asyncio
import re
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from litestar.routes import HTTPRoute

from tests.integration.api_app import SPEC_YAML, ApiEnv, api_env, served
from verlyard_api.adapters.pg_tokens import bootstrap_admin_token
from verlyard_shared import cli


@pytest.fixture
async def api(pg_pool: asyncpg.Pool) -> AsyncIterator[ApiEnv]:
    async with api_env(pg_pool) as env:
        yield env


def every_route(api: ApiEnv) -> list[tuple[str, str]]:
    routes: list[tuple[str, str]] = []
    for route in api.app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        routes += [(method, path) for method in sorted(route.methods) if method != "HEAD"]
    return routes


async def test_every_route_but_healthz_needs_a_token(api: ApiEnv) -> None:
    routes = every_route(api)
    paths = {p for _, p in routes}
    assert {"/healthz", "/readyz", "/schema", "/schema/openapi.json", "/api/v1/pipelines", "/api/v1/events"} <= paths
    for header in (None, "Bearer nope", "Basic dXNlcjpwYXNz", "Bearer vy_" + "B" * 43):
        for method, path in routes:
            headers = {"Authorization": header} if header else {}
            response = await api.client.request(method, path, headers=headers)
            if path == "/healthz" and method == "GET":
                assert response.status_code == 200
                continue
            if method == "GET" and (path == "/" or path == "/ui" or path.startswith("/ui/")):
                continue  # the dashboard's page and files are public (test_api_auth_sweep.py: PUBLIC)
            assert response.status_code == 401, (method, path, header, response.status_code)
            assert response.json()["error"] == "unauthorized"
            assert response.headers["www-authenticate"].startswith("Bearer")


async def test_schema_is_openapi_3_1_for_any_token(api: ApiEnv) -> None:
    response = await api.client.get("/schema", headers=api.auth("viewer"))
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.1") and "/api/v1/pipelines/{pipeline_id}" in schema["paths"]
    assert (
        schema["security"] == [{"bearer": []}]
        and schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    )
    assert schema["paths"]["/healthz"]["get"]["security"] == [{}]  # the one public route
    submit = schema["paths"]["/api/v1/pipelines"]["post"]
    assert {"application/json", "application/yaml"} <= set(submit["requestBody"]["content"])
    assert {"201", "200", "401", "403", "409", "413", "422", "503"} <= set(submit["responses"])
    docs = await api.client.get("/schema/docs", headers=api.auth("viewer"))
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


async def test_roles(api: ApiEnv) -> None:
    yaml = {"Content-Type": "application/yaml"}
    for who, submit, tokens, replay in [
        ("viewer", 403, 403, 403),
        ("member", 201, 403, 403),
        ("admin", 201, 201, 200),
    ]:
        assert (await api.client.get("/api/v1/pipelines", headers=api.auth(who))).status_code == 200
        assert (await api.client.get("/api/v1/events", headers=api.auth(who))).status_code == 200
        response = await api.client.post("/api/v1/pipelines", content=SPEC_YAML, headers=api.auth(who) | yaml)
        assert response.status_code == submit, (who, response.text)
        response = await api.client.post("/api/v1/tokens", json={"role": "viewer"}, headers=api.auth(who))
        assert response.status_code == tokens, (who, response.text)
        assert (await api.client.get("/api/v1/tokens", headers=api.auth(who))).status_code == (
            200 if who == "admin" else 403
        )
        response = await api.client.post("/api/v1/admin/replay?verify=true", headers=api.auth(who))
        assert response.status_code == replay, (who, response.text)
        if response.status_code == 403:
            assert response.json()["error"] == "forbidden" and "admin" in response.json()["detail"]


async def test_created_token_works_and_its_secret_is_never_recorded(api: ApiEnv, pg_pool: asyncpg.Pool) -> None:
    response = await api.client.post(
        "/api/v1/tokens", json={"role": "member", "name": "ci-bot"}, headers=api.auth("admin")
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["role"] == "member" and created["name"] == "ci-bot" and created["token"].startswith("vy_")
    assert response.headers["cache-control"] == "no-store"
    headers = {"Authorization": f"Bearer {created['token']}"}
    submit = await api.client.post(
        "/api/v1/pipelines", content=SPEC_YAML, headers=headers | {"Content-Type": "application/yaml"}
    )
    assert submit.status_code == 201 and submit.json()["submitted_by"] == f"token:{created['id']}:ci-bot"

    listed = (await api.client.get("/api/v1/tokens", headers=api.auth())).json()
    mine = next(t for t in listed["items"] if t["id"] == created["id"])
    assert set(mine) == {"id", "name", "role", "created_at", "created_by"}
    assert mine["created_by"] == f"token:{api.ids['admin']}:admin"

    events = (await api.client.get("/api/v1/events?limit=1000", headers=api.auth())).json()["items"]
    (recorded,) = [e for e in events if e["type"] == "token.created" and e["data"]["token_id"] == created["id"]]
    assert recorded["data"] == {"token_id": created["id"], "name": "ci-bot", "role": "member"}
    assert recorded["stream_id"] == f"token-{created['id']}"
    dump = await pg_pool.fetchval("SELECT string_agg(data::text, ' ') FROM events")
    secret = created["token"].removeprefix("vy_")
    assert secret not in dump


async def test_bootstrap_writes_one_admin_token_with_mode_0600(pg_pool: asyncpg.Pool, tmp_path: Path) -> None:
    path = tmp_path / "home" / "admin-token"
    assert await bootstrap_admin_token(pg_pool, path) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert re.fullmatch(r"vy_[A-Za-z0-9_-]{43}", token)
    assert await bootstrap_admin_token(pg_pool, tmp_path / "other") is False
    assert not (tmp_path / "other").exists()
    async with api_env(pg_pool, roles=()) as env:
        response = await env.client.get("/api/v1/tokens", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        (admin,) = response.json()["items"]
        assert admin["role"] == "admin" and admin["created_by"] == "system:bootstrap"


async def test_concurrent_bootstraps_create_one_token(pg_pool: asyncpg.Pool, tmp_path: Path) -> None:
    results = await asyncio.gather(*(bootstrap_admin_token(pg_pool, tmp_path / f"t{i}") for i in range(3)))
    assert sorted(results) == [False, False, True]
    assert await pg_pool.fetchval("SELECT count(*) FROM tokens") == 1


async def test_cli_token_create(
    api: ApiEnv, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with served(api.app) as url:
        monkeypatch.setenv("VERLYARD_API_URL", url)
        monkeypatch.setenv("VERLYARD_TOKEN", api.tokens["admin"])
        code = await asyncio.to_thread(cli.main, ["token", "create", "--role", "viewer", "--name", "dash"])
        out, err = capsys.readouterr()
        assert code == 0, err
        token = out.strip().splitlines()[-1]  # the server's own log lines share this process's stdout
        assert re.fullmatch(r"vy_[A-Za-z0-9_-]{43}", token) and "viewer token 'dash'" in err
        ok = await api.client.get("/api/v1/pipelines", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200

        monkeypatch.setenv("VERLYARD_TOKEN", api.tokens["member"])
        code = await asyncio.to_thread(cli.main, ["token", "create", "--role", "admin"])
        out, err = capsys.readouterr()
        assert code == 2 and "403 forbidden" in err and "vy_" not in out

        monkeypatch.delenv("VERLYARD_TOKEN")
        monkeypatch.setenv("VERLYARD_HOME", str(Path(url.replace("http://", "/tmp/nowhere-"))))
        code = await asyncio.to_thread(cli.main, ["token", "create", "--role", "admin"])
        assert code == 2 and "no token" in capsys.readouterr().err
