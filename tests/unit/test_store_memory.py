"""Unit: the in-memory event store passes the EventStore contract (the same suite Postgres passes)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from verlyard_shared.store.memory import InMemoryEventStore
from verlyard_shared.store.port import EventStore
from verlyard_shared.testing.store_contract import META, StoreContract, events

FIXED_NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


class TestInMemoryEventStore(StoreContract):
    @pytest.fixture
    async def store(self) -> EventStore:
        return InMemoryEventStore(clock=lambda: FIXED_NOW)


async def test_recorded_at_comes_from_the_clock() -> None:
    store = InMemoryEventStore(clock=lambda: FIXED_NOW)
    await store.append("s-1", 0, events(2), META)
    assert {e.recorded_at for e in await store.read_all()} == {FIXED_NOW}
    assert store.event_types() == ["stage.pending", "stage.pending"]
