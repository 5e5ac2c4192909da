"""Integration: the dashboard's server side. /ui and its static files are public, carry a strict
Content-Security-Policy, refuse anything but the package's own files; whoami, the event-log head, a
pipeline's stream head and the list's name search answer on a real Postgres."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.integration.api_app import ApiEnv, api_env
from verlyard_api.dashboard.routes import STATIC


@pytest.fixture
async def api(pg_pool: asyncpg.Pool) -> AsyncIterator[ApiEnv]:
    async with api_env(pg_pool) as env:
        yield env


async def test_the_page_and_its_files_need_no_token_and_hold_no_third_party_code(api: ApiEnv) -> None:
    page = await api.client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    names = sorted(p.name for p in STATIC.iterdir() if p.name != "index.html")
    assert {"app.js", "app.css", "sse.js", "dag.js", "chart.js"} <= set(names)
    for name in names:
        response = await api.client.get(f"/ui/static/{name}")
        assert response.status_code == 200, name
        text = response.text
        # Nothing fetched from elsewhere at run time: every import and URL is the page's own.
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, name
    js = await api.client.get("/ui/static/app.js")
    assert js.headers["content-type"].startswith("text/javascript")
    root = await api.client.get("/")
    assert root.status_code == 307 and root.headers["location"] == "/ui"


@pytest.mark.parametrize(
    "name", ["nope.js", "..%2Fapp.py", "%2e%2e%2froutes.py", "__init__.py", "index.html", "APP.JS"]
)
async def test_only_the_dashboard_files_are_served(api: ApiEnv, name: str) -> None:
    response = await api.client.get(f"/ui/static/{name}")
    assert response.status_code == 404, (name, response.status_code)
    assert response.json()["error"] == "not_found"


async def test_whoami_names_the_token_and_its_role(api: ApiEnv) -> None:
    for role in ("viewer", "member", "admin"):
        me = (await api.client.get("/api/v1/whoami", headers=api.auth(role))).json()
        assert me["role"] == role and me["token_id"] == api.ids[role]
        assert me["actor"] == f"token:{api.ids[role]}:{role}"
    assert (await api.client.get("/api/v1/whoami")).status_code == 401


async def test_heads_are_where_a_follower_starts(api: ApiEnv) -> None:
    before = (await api.client.get("/api/v1/events/head", headers=api.auth("viewer"))).json()["position"]
    pipeline = await api.submit()
    after = (await api.client.get("/api/v1/events/head", headers=api.auth("viewer"))).json()["position"]
    assert after > before
    head = await api.client.get(f"/api/v1/pipelines/{pipeline['id']}/stream/head", headers=api.auth("viewer"))
    assert head.json() == {"cursor": "e1.m0.l0"}
    missing = await api.client.get("/api/v1/pipelines/nope/stream/head", headers=api.auth("viewer"))
    assert missing.status_code == 404


async def test_the_list_searches_names(api: ApiEnv) -> None:
    spec = {"stages": {"a": {"kind": "noop"}}}
    ids = {name: (await api.submit({**spec, "name": name}))["id"] for name in ("alpha-one", "beta-two", "alpha-three")}
    page = (await api.client.get("/api/v1/pipelines?q=alpha&limit=1", headers=api.auth("viewer"))).json()
    assert [p["id"] for p in page["items"]] == [ids["alpha-three"]] and page["next"]
    rest = await api.client.get(f"/api/v1/pipelines?q=alpha&cursor={page['next']}", headers=api.auth("viewer"))
    assert [p["id"] for p in rest.json()["items"]] == [ids["alpha-one"]]
    bad = await api.client.get("/api/v1/pipelines?q=ALPHA%00", headers=api.auth("viewer"))
    assert bad.status_code == 400 and bad.json()["issues"][0]["path"] == "q"


async def test_the_list_stays_fast_with_ten_thousand_pipelines(api: ApiEnv, pg_pool: asyncpg.Pool) -> None:
    """The dashboard's list reads one keyset page per request, whatever the total: 10,000 read-model rows
    (written straight into the projection: the scheduler is not part of this check), pages, filters and
    the name search each answer in well under half a second (milliseconds in practice; the bound is loose
    for a loaded CI machine)."""
    await pg_pool.execute(
        """
        INSERT INTO pipelines (id, name, status, spec, submitted_by, correlation_id, created_at, updated_at,
                               version, position, submitted_position)
        SELECT 'bulk-' || i, 'bulk-' || lpad(i::text, 5, '0'),
               (ARRAY['pending', 'running', 'succeeded', 'failed', 'cancelled'])[1 + i % 5],
               '{}'::json, 'test', 'c', now(), now(), 1, 1000000 + i, 1000000 + i
        FROM generate_series(1, 10000) AS i
        """
    )
    await pg_pool.execute("ANALYZE pipelines")
    viewer = api.auth("viewer")
    urls = [
        "/api/v1/pipelines?limit=50",
        "/api/v1/pipelines?limit=50&status=failed",
        "/api/v1/pipelines?limit=50&q=bulk-099",
        "/api/v1/pipelines?limit=50&status=running&q=bulk-0",
    ]
    for url in urls:
        await api.client.get(url, headers=viewer)  # warm the pool and the plan
        started = time.perf_counter()
        response = await api.client.get(url, headers=viewer)
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, response.text
        assert 0 < len(response.json()["items"]) <= 50, url
        assert elapsed < 0.5, (url, elapsed)
    page = (await api.client.get("/api/v1/pipelines?limit=50&status=failed", headers=viewer)).json()
    for _ in range(3):  # deep pages cost the same as the first (keyset, not OFFSET)
        started = time.perf_counter()
        page = (await api.client.get(f"/api/v1/pipelines?limit=50&cursor={page['next']}", headers=viewer)).json()
        assert time.perf_counter() - started < 0.5
    names = (await api.client.get("/api/v1/pipelines?q=bulk-0999", headers=viewer)).json()["items"]
    assert sorted(p["name"] for p in names) == [f"bulk-0999{i}" for i in range(10)]
