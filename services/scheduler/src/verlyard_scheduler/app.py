"""Entrypoint: the scheduler service (composition root). Settings from `VERLYARD_*`; stops on SIGTERM.

Connects to Postgres and NATS (retrying until both answer), makes sure the JetStream topology exists,
then runs `SchedulerService`: leader or standby, load -> fold -> decide -> append -> send
(docs/adr/0005-scheduler-pure-core.md, docs/adr/0006-scheduler-service.md).
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from verlyard_scheduler.service import SchedulerConfig, SchedulerService
from verlyard_shared.logging import configure_logging
from verlyard_shared.runtime import retry_until, run_loop, stop_on_signals
from verlyard_shared.settings import Settings

log = structlog.get_logger("verlyard.scheduler")


def config_from(settings: Settings) -> SchedulerConfig:
    """The service's knobs from settings: leases from VERLYARD_LEASE_S; reconciliation at most every 3 s."""
    return SchedulerConfig(lease_s=settings.lease_s, reconcile_s=min(3.0, max(0.5, settings.lease_s / 2)))


async def serve(settings: Settings) -> None:
    from verlyard_shared.nats_topology import connect_nats, ensure_topology, nats_tls
    from verlyard_shared.store.postgres import PostgresEventStore, connect_pool

    stop = asyncio.Event()
    stop_on_signals(stop)
    if settings.database_url is None or settings.nats_url is None:
        raise SystemExit("verlyard scheduler: VERLYARD_DATABASE_URL and VERLYARD_NATS_URL must be set")
    database_url, nats_url = settings.database_url, settings.nats_url
    pool = await retry_until("postgres", lambda: connect_pool(database_url, min_size=1, max_size=4), stop)
    if pool is None:
        return
    nc = None
    try:
        nc = await retry_until(
            "nats",
            lambda: connect_nats(
                nats_url,
                name="verlyard-scheduler",
                user=settings.nats_user,
                password=settings.nats_password,
                creds=settings.nats_creds,
                tls=nats_tls(settings),
            ),
            stop,
        )
        if nc is None:
            return
        js = nc.jetstream()
        await ensure_topology(js)
        service = SchedulerService(
            dsn=database_url, store=PostgresEventStore(pool), js=js, pool=pool, config=config_from(settings)
        )
        log.info("scheduler_ready", lease_s=settings.lease_s)
        await service.run(stop)
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(), timeout=10)


def main(settings: Settings) -> int:
    configure_logging("scheduler", fmt=settings.log_format, level=settings.log_level)
    run_loop(serve(settings))
    return 0
