"""Test helpers: the API app in-process on a real Postgres pool, with one token per role.

`api_env(pool)` builds the Litestar app without NATS (the relay is not needed by these routes) and an
in-process httpx client (`ASGITransport`). Not litestar's `AsyncTestClient`: it runs the app on a
portal thread with its own event loop, where the fixture's asyncpg pool (bound to the test's loop)
cannot be used. `served(app)` runs the same app under uvicorn on a free port, for streaming
responses and the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import uvicorn
from litestar import Litestar

from verlyard_api.app import ApiDeps, create_app
from verlyard_api.auth import Role
from verlyard_api.context import ApiContext
from verlyard_shared.embedded.ports import free_port
from verlyard_shared.envelope import Metadata, NewEvent
from verlyard_shared.events import AnyEvent
from verlyard_shared.ids import new_id, pipeline_stream
from verlyard_shared.store.port import ANY

SPEC_YAML = """\
name: sales-sft
labels: {team: nlp}
stages:
  prep:
    kind: noop
  train:
    kind: noop
    needs: [prep]
  eval:
    kind: noop
    needs: [train]
"""

SPEC_JSON = {
    "name": "tiny",
    "stages": {"a": {"kind": "noop", "with": {"sleep_ms": 1}}, "b": {"kind": "noop", "needs": ["a"]}},
}


@dataclass
class ApiEnv:
    app: Litestar
    deps: ApiDeps
    client: httpx.AsyncClient
    tokens: dict[str, str] = field(default_factory=dict)
    """role (or a name given to `add_token`) -> the bearer token."""
    ids: dict[str, str] = field(default_factory=dict)
    """role -> token id."""

    @property
    def ctx(self) -> ApiContext:
        return self.deps.context()

    def auth(self, who: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    async def add_token(self, who: str, role: Role) -> str:
        view, secret = await self.ctx.tokens.create(
            role=role, name=who, metadata=Metadata(actor="test", correlation_id=new_id())
        )
        self.tokens[who] = secret
        self.ids[who] = view.id
        return secret

    async def submit(self, body: Any = None, *, who: str = "member", key: str | None = None) -> dict[str, Any]:
        headers = self.auth(who) | ({"Idempotency-Key": key} if key else {})
        if body is None:
            response = await self.client.post(
                "/api/v1/pipelines",
                content=SPEC_YAML,
                headers=headers | {"Content-Type": "application/yaml"},
            )
        else:
            response = await self.client.post("/api/v1/pipelines", json=body, headers=headers)
        assert response.status_code == 201, response.text
        data: dict[str, Any] = response.json()
        return data

    async def scheduler(self, pipeline_id: str, *events: AnyEvent) -> int:
        """Append events as the scheduler would, and project them; returns the last position."""
        result = await self.ctx.store.append(
            pipeline_stream(pipeline_id),
            ANY,
            [NewEvent(event_id=new_id(), event=e) for e in events],
            Metadata(actor="scheduler", correlation_id=new_id()),
        )
        await self.ctx.projector.catch_up(result.last_position)
        return result.last_position


@contextlib.asynccontextmanager
async def api_env(
    pool: asyncpg.Pool, *, roles: tuple[Role, ...] = ("admin", "member", "viewer")
) -> AsyncIterator[ApiEnv]:
    deps = ApiDeps(pool=pool)
    app = create_app(deps)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]  # litestar types its scope more loosely
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as client:
        env = ApiEnv(app=app, deps=deps, client=client)
        for role in roles:
            await env.add_token(role, role)
        yield env


@contextlib.asynccontextmanager
async def served(app: Litestar) -> AsyncIterator[str]:
    """Run `app` under uvicorn on a free loopback port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.force_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
