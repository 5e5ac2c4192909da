"""Adapter: group commit over any EventStore. Appends that arrive while one is being committed wait
and are committed together in the next transaction, so N concurrent requests cost one commit (one
WAL flush under the store's ordering lock, ADR 0002) instead of N, and a lone append waits for nothing.

Each caller still gets exactly its own outcome: when a combined transaction fails (one request's
expected version is stale, an event id is reused, two requests race on one stream), nothing of it was
stored (append_many is all-or-nothing), and every request of the group is retried alone, so only the
offending one sees the error; an outage (StoreUnavailable) goes to every caller of the group at once.
Appends with a tracking row pass straight through: their tracking is a consumer's own position and
must commit with exactly their events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from verlyard_shared.envelope import Envelope
from verlyard_shared.store.port import (
    AppendRequest,
    AppendResult,
    EventStore,
    StoreError,
    StoreUnavailable,
    Tracking,
)

MAX_GROUP_REQUESTS = 256
"""At most this many requests share one transaction (bounds its size and its lock time)."""


class _Waiter:
    __slots__ = ("future", "requests")

    def __init__(self, requests: Sequence[AppendRequest], future: asyncio.Future[list[AppendResult]]) -> None:
        self.requests = requests
        self.future = future


class GroupCommitStore(EventStore):
    def __init__(self, inner: EventStore, *, max_requests: int = MAX_GROUP_REQUESTS) -> None:
        self.inner = inner
        self.max_requests = max_requests
        self._queue: list[_Waiter] = []
        self._flushing = False
        self.transactions = 0
        """Transactions committed or tried (for tests and benchmarks: how well appends grouped)."""

    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[AppendResult]:
        if tracking is not None or not requests:
            self.transactions += 1
            return await self.inner.append_many(requests, tracking=tracking)
        future: asyncio.Future[list[AppendResult]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiter(requests, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush_all(), name="group-commit")
        return await future

    async def _flush_all(self) -> None:
        try:
            while self._queue:
                group, size = [], 0
                while self._queue and (not group or size + len(self._queue[0].requests) <= self.max_requests):
                    waiter = self._queue.pop(0)
                    group.append(waiter)
                    size += len(waiter.requests)
                await self._commit(group)
        except asyncio.CancelledError:  # shutting down: nobody may wait forever
            self._fail(self._queue, StoreUnavailable("the event store is shutting down"))
            self._queue.clear()
            raise
        finally:
            self._flushing = False

    async def _commit(self, group: list[_Waiter]) -> None:
        if len(group) > 1:
            self.transactions += 1
            try:
                results = await self.inner.append_many([r for w in group for r in w.requests])
            except StoreUnavailable as exc:
                self._fail(group, exc)
                return
            except StoreError:
                pass  # one of them is at fault (or they clash): each is retried alone below
            except BaseException as exc:  # a bug, a cancellation: every caller learns it
                self._fail(group, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            else:
                at = 0
                for waiter in group:
                    n = len(waiter.requests)
                    if not waiter.future.done():
                        waiter.future.set_result(results[at : at + n])
                    at += n
                return
        for waiter in group:
            self.transactions += 1
            try:
                result = await self.inner.append_many(waiter.requests)
            except BaseException as exc:
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            else:
                if not waiter.future.done():
                    waiter.future.set_result(result)

    @staticmethod
    def _fail(group: list[_Waiter], exc: BaseException) -> None:
        for waiter in group:
            if not waiter.future.done():
                waiter.future.set_exception(exc)

    # ---- reads pass through --------------------------------------------------------------------------

    async def read_stream(self, stream_id: str, *, after_version: int = 0, limit: int | None = None) -> list[Envelope]:
        return await self.inner.read_stream(stream_id, after_version=after_version, limit=limit)

    async def read_all(self, *, after: int = 0, limit: int = 1000) -> list[Envelope]:
        return await self.inner.read_all(after=after, limit=limit)

    async def stream_version(self, stream_id: str) -> int:
        return await self.inner.stream_version(stream_id)

    async def head_position(self) -> int:
        return await self.inner.head_position()

    async def get_tracking(self, consumer: str) -> int:
        return await self.inner.get_tracking(consumer)

    async def set_tracking(self, tracking: Tracking) -> None:
        await self.inner.set_tracking(tracking)
