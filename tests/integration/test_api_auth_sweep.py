"""Integration (T11): every route of the app's own route table (so a new route cannot slip through), called
without a token, with malformed tokens and with unknown ones: 401 with the JSON error shape and
`WWW-Authenticate: Bearer` everywhere but `GET /healthz`. Viewer tokens get 403 on every mutating route,
and every role below a route's guard gets 403 there."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Final

import asyncpg
import httpx
import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute

from tests.integration.api_app import ApiEnv, api_env
from verlyard_api.auth import ROLES, mint_token
from verlyard_api.http import PUBLIC_OPT

PUBLIC: Final = frozenset({("GET", "/healthz"), ("GET", "/"), ("GET", "/ui"), ("GET", "/ui/static/{name:str}")})
"""The only (method, route) a request without a valid token may reach (docs/adr/0006-api-auth.md): /healthz,
and the dashboard's static page and files, which hold no data (docs/adr/0012-web-dashboard.md)."""
MUTATING: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_UNKNOWN_TOKEN, _ = mint_token(bytes(range(32)))  # well-formed, never stored

NO_TOKEN: Final[dict[str, str]] = {}
MALFORMED: Final = [
    "",
    "Bearer",
    "Bearer ",
    "bearer  ",
    "Basic dXNlcjpwYXNz",
    "Token " + _UNKNOWN_TOKEN,
    "Bearer not-a-token",
    "Bearer vy_short",
    "Bearer vy_" + "A" * 42,
    "Bearer vy_" + "A" * 44,
    "Bearer vy_" + "!" * 43,
    "Bearer xy_" + "A" * 43,
    f"Bearer {_UNKNOWN_TOKEN} extra",
]
UNKNOWN: Final = [f"Bearer {_UNKNOWN_TOKEN}", "Bearer vy_" + "B" * 43, "bearer vy_" + "-" * 43]


@pytest.fixture
async def api(pg_pool: asyncpg.Pool) -> AsyncIterator[ApiEnv]:
    async with api_env(pg_pool) as env:
        yield env


def routes(app: Litestar) -> list[tuple[str, str, str]]:
    """(method, route path, a concrete URL) for every method of every route the app serves."""
    out: list[tuple[str, str, str]] = []
    for route in app.routes:
        # A websocket or mounted ASGI route would need its own way of calling it: fail rather than skip it.
        assert isinstance(route, HTTPRoute), f"teach this sweep to call {type(route).__name__} {route.path}"
        url = re.sub(r"\{(\w+):(\w+)\}", lambda m: "1" if m.group(2) in ("int", "float") else "x", route.path)
        assert "{" not in url, route.path
        out.extend((method, route.path, url) for method in sorted(route.methods))
    return out


def handlers(app: Litestar) -> list[tuple[str, str, str, str | None]]:
    """(method, route path, URL, the role its guard needs or None) for every handler but litestar's OPTIONS."""
    out: list[tuple[str, str, str, str | None]] = []
    for method, path, url in routes(app):
        route = next(r for r in app.routes if isinstance(r, HTTPRoute) and r.path == path)
        handler = next(h for h in route.route_handlers if method in h.http_methods)
        if handler.handler_name == "options_handler":
            continue
        roles = [g.__name__.removeprefix("requires_") for g in handler.guards or []]
        roles = [r for r in roles if r in ROLES]
        assert len(roles) <= 1, (method, path, roles)
        out.append((method, path, url, roles[0] if roles else None))
    return out


def assert_unauthorized(response: httpx.Response, what: object) -> None:
    assert response.status_code == 401, (what, response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), what
    body = response.json()
    assert body["error"] == "unauthorized" and isinstance(body["detail"], str) and body["detail"], (what, body)
    assert response.headers["www-authenticate"].startswith("Bearer"), what


def test_the_route_table_is_the_whole_api(api: ApiEnv) -> None:
    """The sweep sees every route (a sanity floor, not its source), and only /healthz is marked public."""
    table = routes(api.app)
    paths = {path for _, path, _ in table}
    assert {
        "/healthz",
        "/readyz",
        "/metrics",
        "/schema",
        "/schema/openapi.json",
        "/api/v1/pipelines",
        "/api/v1/pipelines/{pipeline_id:str}/stream",
        "/api/v1/events",
        "/api/v1/tokens",
        "/api/v1/datasets",
        "/api/v1/agents/{agent_id:str}/drain",
    } <= paths, sorted(paths)
    assert len(table) >= 45, len(table)
    public = {
        (method, path)
        for method, path, _ in table
        for route in api.app.routes
        if isinstance(route, HTTPRoute) and route.path == path
        for handler in route.route_handlers
        if method in handler.http_methods and handler.opt.get(PUBLIC_OPT, False)
    }
    assert public == PUBLIC, public


CREDENTIALS: Final = {
    "none": [NO_TOKEN],
    "malformed": [{"Authorization": h} for h in MALFORMED],
    "unknown": [{"Authorization": h} for h in UNKNOWN],
}


@pytest.mark.parametrize("kind", sorted(CREDENTIALS))
async def test_every_route_but_healthz_answers_401(api: ApiEnv, kind: str) -> None:
    for method, path, url in routes(api.app):
        for headers in CREDENTIALS[kind]:
            response = await api.client.request(method, url, headers=headers)
            if (method, path) in PUBLIC:
                # /ui/static/x is a 404 (no such file) and / a redirect: never a 401.
                assert response.status_code in (200, 307, 404), (method, url, headers, response.status_code)
                continue
            assert_unauthorized(response, (method, url, headers))


async def test_viewers_get_403_on_every_mutating_route(api: ApiEnv) -> None:
    mutating = [(method, path, url) for method, path, url in routes(api.app) if method in MUTATING]
    assert len(mutating) >= 7, mutating  # submit, cancel, retry, tokens, replay, drain, datasets
    for method, path, url in mutating:
        response = await api.client.request(method, url, headers=api.auth("viewer"), json={})
        assert response.status_code == 403, (method, path, response.status_code, response.text[:300])
        body = response.json()
        assert body["error"] == "forbidden" and "role" in body["detail"], (method, path, body)


async def test_every_role_below_a_routes_guard_gets_403(api: ApiEnv) -> None:
    """Each handler's guard names the role it needs; every lower role is refused before the handler runs."""
    guarded = handlers(api.app)
    unguarded = [(m, p) for m, p, _, role in guarded if role is None and (m, p) not in PUBLIC]
    # /readyz and /schema need a token of any role (the middleware), no guard: only they may go without one.
    assert all(p == "/readyz" or p.startswith("/schema") for _, p in unguarded), unguarded
    checked = 0
    for method, path, url, role in guarded:
        if role is None:
            continue
        for lower in ROLES[: ROLES.index(role)]:
            body = {} if method in MUTATING else None
            response = await api.client.request(method, url, headers=api.auth(lower), json=body)
            assert response.status_code == 403, (method, path, lower, response.status_code, response.text[:300])
            assert response.json()["error"] == "forbidden", (method, path, lower)
            checked += 1
    assert checked >= 10, checked
