"""Adapter: bounded database calls. Every call the API makes runs under a deadline and maps a dead or
slow Postgres to `StoreUnavailable` (HTTP 503 + Retry-After), never a hang or a 500 (reliability T14)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Final

import asyncpg

from verlyard_shared.store.port import StoreUnavailable

DB_TIMEOUT_S: Final = 4.0
"""The longest one database call may take (a request stays under 5 s even when Postgres hangs)."""
REQUEST_BUDGET_S: Final = 4.5
"""The database time one HTTP request may spend in all (set by the request middleware)."""

request_deadline: ContextVar[float | None] = ContextVar("verlyard_request_deadline", default=None)
"""`loop.time()` by which the current request's database work must be done; None outside a request."""

_UNAVAILABLE: Final[tuple[type[BaseException], ...]] = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    OSError,  # ConnectionRefusedError, ConnectionResetError, TimeoutError (connect/command timeouts)
)


def is_unavailable(exc: BaseException) -> bool:
    """True for errors that mean "Postgres is down or unreachable", not "the query is wrong"."""
    if isinstance(exc, (StoreUnavailable, *_UNAVAILABLE)):
        return True
    # asyncpg reports use of a connection the server dropped as InterfaceError("connection is closed").
    return isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc)


def start_request_budget() -> None:
    """Give the current request `REQUEST_BUDGET_S` of database time from now."""
    request_deadline.set(time.monotonic() + REQUEST_BUDGET_S)


@contextlib.asynccontextmanager
async def guarded(timeout_s: float | None = None) -> AsyncIterator[None]:
    """Bound the block by `timeout_s` (default: the request's remaining budget, at most `DB_TIMEOUT_S`)
    and map connection failures and timeouts to StoreUnavailable."""
    budget = DB_TIMEOUT_S if timeout_s is None else timeout_s
    deadline = request_deadline.get()
    if timeout_s is None and deadline is not None:
        budget = min(budget, deadline - time.monotonic())
    if budget <= 0:
        raise StoreUnavailable("the request's database time budget is spent")
    try:
        async with asyncio.timeout(budget):
            yield
    except StoreUnavailable:
        raise
    except TimeoutError as exc:
        raise StoreUnavailable(f"postgres did not answer within {budget:.1f}s") from exc
    except Exception as exc:
        if is_unavailable(exc):
            raise StoreUnavailable(f"postgres is unavailable: {type(exc).__name__}") from exc
        raise
