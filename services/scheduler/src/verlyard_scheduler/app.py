"""Entrypoint: the scheduler service (composition root).

Foundation scope: it connects to Postgres and NATS (retrying until both answer) and stays up under
supervision. The load -> fold -> decide -> append loop is wired here by the scheduler issue (#3).
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from verlyard_shared.logging import configure_logging
from verlyard_shared.runtime import retry_until, stop_on_signals
from verlyard_shared.settings import Settings

log = structlog.get_logger("verlyard.scheduler")


async def serve(settings: Settings) -> None:
    from verlyard_shared.nats_topology import connect_nats
    from verlyard_shared.store.postgres import connect_pool

    stop = asyncio.Event()
    stop_on_signals(stop)
    if settings.database_url is None or settings.nats_url is None:
        raise SystemExit("verlyard scheduler: VERLYARD_DATABASE_URL and VERLYARD_NATS_URL must be set")
    database_url, nats_url = settings.database_url, settings.nats_url
    pool = await retry_until("postgres", lambda: connect_pool(database_url, min_size=1, max_size=4), stop)
    nc = await retry_until(
        "nats",
        lambda: connect_nats(
            nats_url,
            name="verlyard-scheduler",
            user=settings.nats_user,
            password=settings.nats_password,
            creds=settings.nats_creds,
        ),
        stop,
    )
    try:
        if pool is not None and nc is not None:
            log.info("scheduler_ready")
            await stop.wait()
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.close()
        log.info("scheduler_stopped")


def main(settings: Settings) -> int:
    configure_logging("scheduler", fmt=settings.log_format, level=settings.log_level)
    asyncio.run(serve(settings))
    return 0
