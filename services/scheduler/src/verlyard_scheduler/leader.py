"""Adapter: leadership. One scheduler acts at a time: the holder of a session-level Postgres advisory lock.

The lock lives on a dedicated connection (not a pooled one: a pool resets sessions). Postgres releases
it the moment that session ends, so a leader killed with SIGKILL frees it at once (its socket closes)
and a standby, retrying every `retry_s`, takes over within about a second. A leader whose lock
connection fails must stop acting at once: `Leadership.lost` is set by a termination listener and by
a `SELECT 1` probe every `check_s`. Appends also carry expected versions, so even an ex-leader that has
not noticed yet cannot place a stage twice (docs/adr/0006-scheduler-service.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

log = structlog.get_logger("verlyard.scheduler.leader")

LOCK_NAME = "verlyard.scheduler"
_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"

Listener = Callable[[Any, int, str, str], None]


class Leadership:
    """A held leader lock. `lost` is set once the lock can no longer be trusted; never cleared."""

    def __init__(self, conn: asyncpg.Connection, name: str, check_s: float) -> None:
        self.conn = conn
        self.name = name
        self.lost = asyncio.Event()
        self._check_s = check_s
        self._listeners: list[tuple[str, Listener]] = []
        self._busy = asyncio.Lock()  # one operation at a time on the connection (the probe, LISTEN)
        conn.add_termination_listener(self._on_terminate)
        self._watch = asyncio.create_task(self._watch_loop(), name="scheduler-lock-watch")

    def _on_terminate(self, _conn: object) -> None:
        self._mark_lost("connection terminated")

    def _mark_lost(self, why: str) -> None:
        if not self.lost.is_set():
            log.warning("scheduler_leadership_lost", reason=why)
            self.lost.set()

    async def _watch_loop(self) -> None:
        while not self.lost.is_set():
            await asyncio.sleep(self._check_s)
            try:
                async with self._busy:
                    await asyncio.wait_for(self.conn.fetchval("SELECT 1"), timeout=max(2.0, 2 * self._check_s))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._mark_lost(f"lock connection failed: {type(exc).__name__}")

    async def listen(self, channel: str, callback: Listener) -> None:
        """LISTEN on the lock's own connection (a notification wakes the loop; it never carries data)."""
        async with self._busy:
            await self.conn.add_listener(channel, callback)
        self._listeners.append((channel, callback))

    async def release(self) -> None:
        """Give the lock back (closing the session releases it even if the unlock fails)."""
        self._watch.cancel()
        await asyncio.wait({self._watch}, timeout=5)
        self.lost.set()
        with contextlib.suppress(Exception):
            self.conn.remove_termination_listener(self._on_terminate)
        if not self.conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.conn.close(), timeout=5)
        if not self.conn.is_closed():
            self.conn.terminate()


async def _connect(dsn: str) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=5)
    return conn


async def acquire_leadership(
    dsn: str,
    stop: asyncio.Event,
    *,
    name: str = LOCK_NAME,
    retry_s: float = 1.0,
    check_s: float = 1.0,
) -> Leadership | None:
    """Wait until this process holds the leader lock (None when `stop` is set first).

    A standby keeps one connection and retries `pg_try_advisory_lock` every `retry_s`; a failed
    connection is reopened on the next try.
    """
    conn: asyncpg.Connection | None = None
    waiting_logged = False
    try:
        while not stop.is_set():
            try:
                current = conn if conn is not None and not conn.is_closed() else await _connect(dsn)
                conn = current
                if await asyncio.wait_for(current.fetchval(_TRY_LOCK, name), timeout=5):
                    leadership = Leadership(current, name, check_s)
                    conn = None  # owned by the leadership now
                    return leadership
                if not waiting_logged:
                    log.info("scheduler_standby", lock=name)
                    waiting_logged = True
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("scheduler_lock_retry", error=type(exc).__name__, retry_in_s=retry_s)
                if conn is not None:
                    conn.terminate()
                    conn = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=retry_s)
        return None
    finally:
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=5)
