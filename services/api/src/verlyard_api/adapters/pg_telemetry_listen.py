"""Adapter: wake live-stream followers when telemetry of THEIR pipeline commits (LISTEN verlyard_telemetry).

The persisters `pg_notify('verlyard_telemetry', <pipeline id>)` inside their insert transaction, so the
notification is delivered when the rows are visible, to every API process. Followers also poll:
a lost notification costs latency, never data.
"""

from __future__ import annotations

import asyncio
from typing import Final

import asyncpg

from verlyard_api.adapters.pg_listen import listen

TELEMETRY_CHANNEL: Final = "verlyard_telemetry"
"""Payload: the pipeline id whose metric points or log lines just committed."""


class KeyedWakeup:
    """A "something changed for key K" broadcast: `arm(k)` before looking, then wait on the event it returns."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def arm(self, key: str) -> asyncio.Event:
        event = self._events.get(key)
        if event is None:
            event = self._events[key] = asyncio.Event()
        return event

    def notify(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    def notify_all(self) -> None:
        events, self._events = self._events, {}
        for event in events.values():
            event.set()


class TelemetryListener:
    """Holds one pooled connection that LISTENs on `verlyard_telemetry` and wakes that pipeline's followers."""

    def __init__(self, pool: asyncpg.Pool, wakeup: KeyedWakeup) -> None:
        self._pool = pool
        self.wakeup = wakeup

    async def run(self, stop: asyncio.Event) -> None:
        await listen(
            self._pool,
            TELEMETRY_CHANNEL,
            self.wakeup.notify,
            self.wakeup.notify_all,
            stop,
            failure="telemetry_listen_failed",
        )


async def wait_any(events: list[asyncio.Event], timeout: float) -> bool:
    """True as soon as one of `events` is set, False after `timeout` seconds."""
    if any(e.is_set() for e in events):
        return True
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)
