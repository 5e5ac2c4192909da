"""Unit: the group-commit store passes the EventStore contract over the in-memory store, groups
concurrent appends into one transaction, and gives each caller its own outcome when a group fails."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from verlyard_shared.store.grouped import GroupCommitStore
from verlyard_shared.store.memory import InMemoryEventStore
from verlyard_shared.store.port import (
    NO_STREAM,
    AppendRequest,
    AppendResult,
    EventStore,
    StoreUnavailable,
    Tracking,
    WrongExpectedVersion,
)
from verlyard_shared.testing.store_contract import META, StoreContract, events

FIXED_NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


class TestGroupCommitStore(StoreContract):
    @pytest.fixture
    async def store(self) -> EventStore:
        return GroupCommitStore(InMemoryEventStore(clock=lambda: FIXED_NOW))


class _Slow(InMemoryEventStore):
    """Holds every transaction open until released, so appends pile up behind the first."""

    def __init__(self) -> None:
        super().__init__(clock=lambda: FIXED_NOW)
        self.gate = asyncio.Event()
        self.sizes: list[int] = []
        self.fail_on: dict[int, BaseException] = {}
        """Transaction number (1-based) -> what it raises."""

    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[AppendResult]:
        self.sizes.append(len(requests))
        await self.gate.wait()
        if (exc := self.fail_on.pop(len(self.sizes), None)) is not None:
            raise exc
        return await super().append_many(requests, tracking=tracking)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_appends_arriving_during_a_commit_share_the_next_one() -> None:
    inner = _Slow()
    store = GroupCommitStore(inner)
    first = asyncio.ensure_future(store.append("s-0", NO_STREAM, events(1), META))
    await _settle()
    rest = [asyncio.ensure_future(store.append(f"s-{i}", NO_STREAM, events(2), META)) for i in range(1, 6)]
    await _settle()
    inner.gate.set()
    results = await asyncio.gather(first, *rest)
    assert inner.sizes == [1, 5], "the lone first append went alone; the five that waited went together"
    assert [r.stream_id for r in results] == [f"s-{i}" for i in range(6)]
    assert [r.last_version for r in results] == [1, 2, 2, 2, 2, 2]
    assert store.transactions == 2 and len(await store.read_all()) == 11


async def test_a_stale_request_fails_alone_and_the_rest_of_its_group_is_stored() -> None:
    inner = _Slow()
    inner.gate.set()
    store = GroupCommitStore(inner)
    await store.append("taken", NO_STREAM, events(1), META)
    inner.gate.clear()
    blocker = asyncio.ensure_future(store.append("b", NO_STREAM, events(1), META))
    await _settle()
    good = asyncio.ensure_future(store.append("g", NO_STREAM, events(1), META))
    stale = asyncio.ensure_future(store.append("taken", NO_STREAM, events(1), META))
    good2 = asyncio.ensure_future(store.append("g2", NO_STREAM, events(1), META))
    await _settle()
    inner.gate.set()
    await blocker
    assert (await good).stream_id == "g" and (await good2).stream_id == "g2"
    with pytest.raises(WrongExpectedVersion):
        await stale
    assert inner.sizes[-4:] == [3, 1, 1, 1], "the failed group of three was retried one by one"
    assert sorted({e.stream_id for e in await store.read_all()}) == ["b", "g", "g2", "taken"]


async def test_an_outage_reaches_every_caller_of_the_group() -> None:
    inner = _Slow()
    store = GroupCommitStore(inner)
    blocker = asyncio.ensure_future(store.append("b", NO_STREAM, events(1), META))
    await _settle()
    group = [asyncio.ensure_future(store.append(f"s-{i}", NO_STREAM, events(1), META)) for i in range(3)]
    await _settle()
    inner.fail_on[2] = StoreUnavailable("postgres is away")
    inner.gate.set()
    outcomes = await asyncio.gather(blocker, *group, return_exceptions=True)
    assert isinstance(outcomes[0], AppendResult)
    assert all(isinstance(o, StoreUnavailable) for o in outcomes[1:]), outcomes
    assert inner.sizes == [1, 3], "an outage is not retried one by one: every caller gets it at once"
    assert [e.stream_id for e in await store.read_all()] == ["b"]


async def test_appends_with_a_tracking_row_are_never_grouped() -> None:
    inner = _Slow()
    inner.gate.set()
    store = GroupCommitStore(inner)
    await asyncio.gather(
        store.append("a", NO_STREAM, events(1), META, tracking=Tracking(consumer="c", position=0)),
        store.append("b", NO_STREAM, events(1), META, tracking=Tracking(consumer="d", position=0)),
    )
    assert inner.sizes == [1, 1]
