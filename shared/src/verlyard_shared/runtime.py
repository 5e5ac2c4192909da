"""Adapter: process plumbing every service shares: logging set-up, stop on SIGTERM/SIGINT, retrying connects."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import structlog

T = TypeVar("T")


def stop_on_signals(stop: asyncio.Event) -> None:
    """Set `stop` on SIGTERM or SIGINT (call from inside the running loop)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def retry_until(
    what: str,
    connect: Callable[[], Awaitable[T]],
    stop: asyncio.Event,
    *,
    first_delay_s: float = 0.2,
    max_delay_s: float = 5.0,
) -> T | None:
    """Call `connect` until it succeeds or `stop` is set (returns None then); log each failure once."""
    log = structlog.get_logger("verlyard.runtime")
    delay = first_delay_s
    while not stop.is_set():
        try:
            return await connect()
        except (OSError, ConnectionError, TimeoutError) as exc:
            log.warning("connect_failed", target=what, error=type(exc).__name__, retry_in_s=delay)
        except Exception as exc:  # asyncpg/nats raise their own types for "not yet up"
            log.warning("connect_failed", target=what, error=type(exc).__name__, retry_in_s=delay)
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except TimeoutError:
            pass
        delay = min(delay * 2, max_delay_s)
    return None


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a service's main coroutine on uvloop when it is installed (the API and the scheduler are
    network-bound; uvloop roughly halves the event loop's own cost per socket operation), else on
    asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
