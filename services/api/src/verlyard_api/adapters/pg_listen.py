"""Adapter: wake in-process readers (the projector, SSE followers) when an append commits (LISTEN verlyard_events).

Notifications only shorten waits: every reader also polls, so a lost notification or a dropped
listener connection costs latency, never events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from verlyard_shared.store.postgres import NOTIFY_CHANNEL

log = structlog.get_logger("verlyard.api.listen")


class Wakeup:
    """A broadcast "something changed": `arm()` before looking, then `wait(armed, timeout)` if nothing was found,
    so a change that lands between the look and the wait is not missed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def arm(self) -> asyncio.Event:
        return self._event

    def notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    @staticmethod
    async def wait(armed: asyncio.Event, timeout: float) -> bool:
        """True when notified, False after `timeout` seconds."""
        try:
            await asyncio.wait_for(armed.wait(), timeout)
        except TimeoutError:
            return False
        return True


class EventListener:
    """Holds one pooled connection that LISTENs for appends and calls `wakeup.notify()` on each."""

    def __init__(self, pool: asyncpg.Pool, wakeup: Wakeup) -> None:
        self._pool = pool
        self.wakeup = wakeup

    async def run(self, stop: asyncio.Event) -> None:
        # Every append may matter to every reader: wake them all, whatever the payload.
        await listen(
            self._pool,
            NOTIFY_CHANNEL,
            lambda _payload: self.wakeup.notify(),
            self.wakeup.notify,
            stop,
            failure="listen_failed",
        )


async def listen(
    pool: asyncpg.Pool,
    channel: str,
    on_payload: Callable[[str], None],
    on_connected: Callable[[], None],
    stop: asyncio.Event,
    *,
    failure: str,
) -> None:
    """LISTEN on `channel` over one pooled connection until `stop`, calling `on_payload` per notification.

    `on_connected` runs after each (re)connect, for what committed while nobody listened. A lost
    connection is retried with backoff; readers keep polling meanwhile, so it costs latency only.
    """

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        on_payload(payload)

    delay = 0.2
    while not stop.is_set():
        conn: Any = None
        try:
            async with asyncio.timeout(5):
                conn = await pool.acquire()
                await conn.add_listener(channel, on_notify)
            delay = 0.2
            on_connected()
            while not stop.is_set() and not conn.is_closed():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
        except Exception as exc:  # Postgres down: retry with backoff
            log.warning(failure, channel=channel, error=type(exc).__name__, retry_in_s=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 5.0)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.remove_listener(channel, on_notify)
                with contextlib.suppress(Exception):
                    await pool.release(conn, timeout=2)
