"""Integration (T5): optimistic concurrency on real Postgres; 50 racers, one winner, an idempotent retry."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from verlyard_shared.store.port import NO_STREAM, AppendResult, WrongExpectedVersion
from verlyard_shared.store.postgres import PostgresEventStore
from verlyard_shared.testing.store_contract import META, events

RACERS = 50


async def _race(store: PostgresEventStore, stream: str, expected: int) -> tuple[list[AppendResult], list[Exception]]:
    batches = [events(2) for _ in range(RACERS)]
    outcomes = await asyncio.gather(
        *(store.append(stream, expected, batch, META) for batch in batches), return_exceptions=True
    )
    wins = [o for o in outcomes if isinstance(o, AppendResult)]
    losses = [o for o in outcomes if isinstance(o, Exception)]
    assert len(wins) == 1, f"{len(wins)} winners: {outcomes!r}"
    winner_batch = batches[outcomes.index(wins[0])]
    retry = await store.append(stream, expected, winner_batch, META)
    assert retry == AppendResult(
        stream_id=stream,
        first_version=wins[0].first_version,
        last_version=wins[0].last_version,
        first_position=wins[0].first_position,
        last_position=wins[0].last_position,
        duplicate=True,
    )
    return wins, losses


@pytest.mark.parametrize("expected", [NO_STREAM, 3])
async def test_fifty_appends_with_one_expected_version(pg_store: PostgresEventStore, expected: int) -> None:
    stream = f"t5-{expected}"
    if expected:
        await pg_store.append(stream, NO_STREAM, events(expected), META)
    wins, losses = await _race(pg_store, stream, expected)
    assert len(losses) == RACERS - 1
    assert all(isinstance(loss, WrongExpectedVersion) for loss in losses)
    assert {(loss.expected, loss.actual) for loss in losses if isinstance(loss, WrongExpectedVersion)} == {
        (expected, expected + 2)
    }
    assert await pg_store.stream_version(stream) == expected + 2
    assert len(await pg_store.read_stream(stream, after_version=expected)) == 2
    assert wins[0].first_version == expected + 1


async def test_the_unique_constraint_alone_also_yields_one_winner(pg_pool: asyncpg.Pool) -> None:
    """Without the lock the version check races; UNIQUE (stream_id, version) still turns losers into 409s."""
    store = PostgresEventStore(pg_pool, ordering_guard=False)
    _, losses = await _race(store, "t5-unguarded", NO_STREAM)
    assert len(losses) == RACERS - 1
    assert all(isinstance(loss, WrongExpectedVersion) for loss in losses), losses
    assert await store.stream_version("t5-unguarded") == 2
