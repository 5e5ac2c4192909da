"""Entrypoint: the API service (composition root). Litestar over uvicorn, the outbox relay beside it."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import structlog
import uvicorn
from litestar import Litestar, get
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.response import Response
from litestar.status_codes import HTTP_503_SERVICE_UNAVAILABLE
from nats.aio.client import Client as NATS

from verlyard_api.auth import Principal
from verlyard_api.context import ApiContext
from verlyard_api.errors import Unavailable
from verlyard_api.http import AuthMiddleware, RequestIdMiddleware, allow_header, before_send, handle_exception
from verlyard_api.openapi import ClosedStructSchemaPlugin, error_responses, openapi_config
from verlyard_api.ops_http import TimingMiddleware, request_recorder
from verlyard_api.routes import ROUTES
from verlyard_api.services import Services
from verlyard_shared.hosts.vault import KeyRing, VaultError
from verlyard_shared.logging import configure_logging
from verlyard_shared.runtime import retry_until, run_loop, stop_on_signals
from verlyard_shared.settings import Settings

log = structlog.get_logger("verlyard.api")

MAX_BODY_BYTES = 1024 * 1024
"""Default request body limit (413 above it); routes that take uploads set their own."""


@dataclass
class ApiDeps:
    """What the HTTP handlers need; None while a backing service is not connected yet."""

    pool: asyncpg.Pool | None = None
    nc: NATS | None = None
    relay_lag: dict[str, Any] = field(default_factory=dict)
    ctx: ApiContext | None = None
    """Store, projector and tokens on `pool` (routes answer 503 until it is set)."""
    services: Services = field(default_factory=Services)
    """Telemetry wake-ups, live heartbeats, the dataset store, /metrics counters (services.py)."""

    def context(self) -> ApiContext:
        if self.ctx is None:
            if self.pool is None:
                raise Unavailable("the API is starting: the database is not connected yet")
            self.ctx = ApiContext.create(self.pool)
        return self.ctx


@get("/healthz", sync_to_thread=False, opt={"public": True}, security=[{}])
def healthz() -> dict[str, str]:
    """Liveness: the process serves HTTP (no token needed)."""
    return {"status": "ok"}


def create_app(deps: ApiDeps) -> Litestar:
    @get("/readyz", responses=error_responses())
    async def readyz() -> Response[dict[str, Any]]:
        """Readiness: Postgres answers and NATS is connected."""
        problems: list[str] = []
        if deps.pool is None:
            problems.append("database not connected")
        else:
            try:
                async with asyncio.timeout(2):
                    await deps.pool.fetchval("SELECT 1")
            except Exception as exc:
                problems.append(f"database unavailable ({type(exc).__name__})")
        if deps.nc is None or not deps.nc.is_connected:
            problems.append("nats not connected")
        if problems:
            return Response(
                {"error": "unavailable", "detail": "; ".join(problems)},
                status_code=HTTP_503_SERVICE_UNAVAILABLE,
                headers={"Retry-After": "1"},
            )
        return Response({"status": "ready"})

    async def authenticate(token: str) -> Principal | None:
        return await deps.context().tokens.authenticate(token)

    return Litestar(
        route_handlers=[healthz, readyz, *ROUTES],
        dependencies={
            "ctx": Provide(deps.context, sync_to_thread=False),
            "svc": Provide(lambda: deps.services, sync_to_thread=False),
        },
        # Request ids first (outermost), so authentication failures carry one too.
        middleware=[
            RequestIdMiddleware,
            TimingMiddleware,
            DefineMiddleware(AuthMiddleware, authenticate=authenticate),
        ],
        exception_handlers={Exception: handle_exception},
        before_send=[before_send, allow_header, request_recorder(deps.services.ops)],
        # Everything but /healthz needs a token, /schema included (docs/adr/0006-api-auth.md).
        openapi_config=openapi_config(),
        plugins=[ClosedStructSchemaPlugin()],
        request_max_body_size=MAX_BODY_BYTES,
        debug=False,
    )


async def serve(settings: Settings) -> None:
    from verlyard_api.adapters.dataset_store import DatasetStore
    from verlyard_api.adapters.nats_telemetry import TelemetryPersister
    from verlyard_api.adapters.pg_telemetry_listen import TelemetryListener
    from verlyard_api.adapters.pg_tokens import bootstrap_admin_token
    from verlyard_api.relay import OutboxRelay
    from verlyard_shared.nats_topology import connect_nats, ensure_topology, nats_tls
    from verlyard_shared.store.migrate import migrate
    from verlyard_shared.store.postgres import connect_pool

    stop = asyncio.Event()
    stop_on_signals(stop)
    deps = ApiDeps()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(deps),
            host=settings.api_host,
            port=settings.api_port,
            log_config=None,
            lifespan="on",
            # verlyard's own `http_request` line (http.py) is the access log; uvicorn's would be a
            # second, unstructured one per request, formatted on a logging thread.
            access_log=False,
        )
    )
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # we own SIGTERM
    http = asyncio.create_task(server.serve(), name="http")
    tasks: list[asyncio.Task[Any]] = [http]
    try:
        if settings.database_url is None or settings.nats_url is None:
            raise SystemExit("verlyard api: VERLYARD_DATABASE_URL and VERLYARD_NATS_URL must be set")
        database_url, nats_url = settings.database_url, settings.nats_url
        deps.pool = await retry_until("postgres", lambda: connect_pool(database_url), stop)
        if deps.pool is None:
            return
        await migrate(deps.pool)
        deps.services.key_ring = await open_vault(deps.pool, settings.secret_key)
        ctx = deps.context()
        if os.environ.get("VERLYARD_HOME"):
            # The embedded stack: the first start creates an admin token for the local user.
            await bootstrap_admin_token(deps.pool, Path(settings.home) / "admin-token")
        tasks.append(asyncio.create_task(ctx.listener.run(stop), name="listener"))
        tasks.append(asyncio.create_task(ctx.projector.run(stop), name="projector"))
        services = deps.services
        services.max_dataset_bytes = settings.max_dataset_bytes
        telemetry_listener = TelemetryListener(deps.pool, services.telemetry)
        tasks.append(asyncio.create_task(telemetry_listener.run(stop), name="telemetry-listener"))
        deps.nc = await retry_until(
            "nats",
            lambda: connect_nats(
                nats_url,
                name="verlyard-api",
                user=settings.nats_user,
                password=settings.nats_password,
                creds=settings.nats_creds,
                tls=nats_tls(settings),
            ),
            stop,
        )
        if deps.nc is None:
            return
        js = deps.nc.jetstream()
        await ensure_topology(js)
        relay = OutboxRelay(deps.pool, js)
        tasks.append(asyncio.create_task(relay.run(stop), name="relay"))
        services.relay_lag = lambda: relay.lag
        services.datasets = DatasetStore(settings.datasets_dir or Path(settings.home) / "datasets", js=js)
        await services.live_agents.start(deps.nc)
        for kind in ("metric", "log"):
            persister = TelemetryPersister(
                js,
                deps.pool,
                kind,
                on_commit=services.committed,
                ops=services.ops,  # type: ignore[arg-type]
            )
            tasks.append(asyncio.create_task(persister.run(stop), name=f"{kind}-persister"))
        log.info("api_ready", host=settings.api_host, port=settings.api_port)
        await stop.wait()
    finally:
        stop.set()
        server.should_exit = True
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=10)
        await deps.services.live_agents.stop()
        if deps.nc is not None:
            with contextlib.suppress(Exception):
                await deps.nc.close()
        if deps.pool is not None:
            with contextlib.suppress(Exception):
                await deps.pool.close()
        log.info("api_stopped")


async def open_vault(pool: asyncpg.Pool, secret_key: str | None) -> KeyRing | None:
    """Parse VERLYARD_SECRET_KEY and fail closed (SystemExit) when registered hosts could not be opened."""
    from verlyard_shared.hosts.pg import check_vault

    try:
        ring = KeyRing.parse(secret_key) if secret_key else None
        await check_vault(pool, ring)
    except VaultError as exc:
        log.error("secret_key_refused", detail=str(exc))
        raise SystemExit(f"verlyard api: {exc}") from None
    return ring


def main(settings: Settings) -> int:
    configure_logging("api", fmt=settings.log_format, level=settings.log_level)
    run_loop(serve(settings))
    return 0
