"""Test support: the EventStore contract, one suite run against the in-memory fake AND Postgres.

Subclass `StoreContract` in a test module and provide an async `store` fixture that yields a fresh,
empty store; every `test_*` method below then runs against it (pyeventsourcing's pattern).
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime

import pytest

from verlyard_shared.envelope import Envelope, Metadata, NewEvent
from verlyard_shared.events import StagePending
from verlyard_shared.store.port import (
    ANY,
    NO_STREAM,
    AppendRequest,
    AppendResult,
    DuplicateEventId,
    EventStore,
    Tracking,
    TrackingMovedBackwards,
    WrongExpectedVersion,
)

_ids = itertools.count(1)

META = Metadata(actor="contract-test", correlation_id="corr-1", causation_id="cause-1")


def new_event(stage: str = "train", *, event_id: str | None = None, reason: str = "no free gpu") -> NewEvent:
    """A small, valid event with a unique id (unless one is given)."""
    return NewEvent(
        event_id=event_id or f"evt-{next(_ids):08d}",
        event=StagePending(pipeline_id="p1", stage=stage, reason=reason),
    )


def events(n: int, stage: str = "train") -> list[NewEvent]:
    return [new_event(f"{stage}-{i}") for i in range(n)]


def request(stream_id: str, expected_version: int, batch: list[NewEvent]) -> AppendRequest:
    return AppendRequest(stream_id=stream_id, expected_version=expected_version, events=tuple(batch), metadata=META)


def ids(envelopes: list[Envelope]) -> list[str]:
    return [e.event_id for e in envelopes]


class StoreContract:
    """The semantics of `verlyard_shared.store.port.EventStore`; subclasses provide the `store` fixture."""

    # ---- append and read ------------------------------------------------------------------------

    async def test_append_then_read_stream(self, store: EventStore) -> None:
        batch = events(3)
        result = await store.append("s-1", NO_STREAM, batch, META)
        assert (result.stream_id, result.first_version, result.last_version) == ("s-1", 1, 3)
        assert result.last_position - result.first_position == 2
        assert not result.duplicate
        read = await store.read_stream("s-1")
        assert ids(read) == [e.event_id for e in batch]
        assert [e.version for e in read] == [1, 2, 3]
        assert [e.event for e in read] == [e.event for e in batch]
        assert await store.stream_version("s-1") == 3

    async def test_envelope_carries_metadata(self, store: EventStore) -> None:
        await store.append("s-1", NO_STREAM, events(1), META)
        (envelope,) = await store.read_all()
        assert envelope.actor == "contract-test"
        assert envelope.correlation_id == "corr-1"
        assert envelope.causation_id == "cause-1"
        assert envelope.schema_version == 1
        assert isinstance(envelope.recorded_at, datetime)
        assert envelope.recorded_at.tzinfo is not None

    async def test_read_stream_after_version_and_limit(self, store: EventStore) -> None:
        await store.append("s-1", NO_STREAM, events(5), META)
        assert [e.version for e in await store.read_stream("s-1", after_version=2)] == [3, 4, 5]
        assert [e.version for e in await store.read_stream("s-1", after_version=1, limit=2)] == [2, 3]
        assert await store.read_stream("s-1", after_version=5) == []
        assert await store.read_stream("missing") == []

    async def test_read_all_in_position_order_with_paging(self, store: EventStore) -> None:
        first = await store.append("a", NO_STREAM, events(2), META)
        second = await store.append("b", NO_STREAM, events(2), META)
        await store.append("a", 2, events(1), META)
        everything = await store.read_all()
        positions = [e.position for e in everything]
        assert positions == sorted(positions)
        assert len(set(positions)) == 5
        assert [e.stream_id for e in everything] == ["a", "a", "b", "b", "a"]
        assert positions[0] == first.first_position
        assert positions[3] == second.last_position
        page = await store.read_all(after=first.last_position, limit=2)
        assert [e.stream_id for e in page] == ["b", "b"]
        rest = await store.read_all(after=page[-1].position)
        assert [e.stream_id for e in rest] == ["a"]
        assert await store.read_all(after=rest[-1].position) == []

    async def test_head_position(self, store: EventStore) -> None:
        assert await store.head_position() == 0
        result = await store.append("s-1", NO_STREAM, events(3), META)
        assert await store.head_position() == result.last_position
        (last,) = await store.read_all(after=result.last_position - 1)
        assert last.position == result.last_position

    async def test_empty_append_is_refused(self, store: EventStore) -> None:
        with pytest.raises(ValueError, match="at least one event"):
            await store.append("s-1", NO_STREAM, [], META)

    # ---- optimistic concurrency -----------------------------------------------------------------

    async def test_no_stream_means_the_stream_must_not_exist(self, store: EventStore) -> None:
        await store.append("s-1", NO_STREAM, events(1), META)
        with pytest.raises(WrongExpectedVersion) as caught:
            await store.append("s-1", NO_STREAM, events(1), META)
        assert (caught.value.stream_id, caught.value.expected, caught.value.actual) == ("s-1", 0, 1)
        assert await store.stream_version("s-1") == 1

    async def test_expected_version_must_match(self, store: EventStore) -> None:
        await store.append("s-1", NO_STREAM, events(2), META)
        result = await store.append("s-1", 2, events(1), META)
        assert result.first_version == 3
        for stale in (1, 2, 4):
            with pytest.raises(WrongExpectedVersion):
                await store.append("s-1", stale, events(1), META)
        with pytest.raises(WrongExpectedVersion):
            await store.append("missing", 1, events(1), META)
        assert await store.stream_version("s-1") == 3
        assert await store.stream_version("missing") == 0

    async def test_any_skips_the_check(self, store: EventStore) -> None:
        first = await store.append("s-1", ANY, events(1), META)
        second = await store.append("s-1", ANY, events(2), META)
        assert (first.first_version, second.first_version, second.last_version) == (1, 2, 3)

    async def test_concurrent_appends_with_one_expected_version(self, store: EventStore) -> None:
        attempts = [store.append("s-1", NO_STREAM, events(1), META) for _ in range(10)]
        outcomes = await asyncio.gather(*attempts, return_exceptions=True)
        assert sum(isinstance(o, AppendResult) for o in outcomes) == 1
        assert sum(isinstance(o, WrongExpectedVersion) for o in outcomes) == 9
        assert await store.stream_version("s-1") == 1

    # ---- idempotency by event id ----------------------------------------------------------------

    async def test_retry_returns_the_original_result(self, store: EventStore) -> None:
        batch = events(2)
        original = await store.append("s-1", NO_STREAM, batch, META)
        await store.append("s-1", 2, events(1), META)  # the stream moved on meanwhile
        retry = await store.append("s-1", NO_STREAM, batch, META)
        assert retry == AppendResult(
            stream_id="s-1",
            first_version=original.first_version,
            last_version=original.last_version,
            first_position=original.first_position,
            last_position=original.last_position,
            duplicate=True,
        )
        assert len(await store.read_all()) == 3

    async def test_reused_id_on_another_stream_is_refused(self, store: EventStore) -> None:
        batch = events(1)
        await store.append("s-1", NO_STREAM, batch, META)
        with pytest.raises(DuplicateEventId) as caught:
            await store.append("s-2", NO_STREAM, batch, META)
        assert caught.value.event_id == batch[0].event_id
        assert await store.stream_version("s-2") == 0

    async def test_reused_id_with_other_content_is_refused(self, store: EventStore) -> None:
        original = new_event(reason="first")
        await store.append("s-1", NO_STREAM, [original], META)
        changed = new_event(event_id=original.event_id, reason="second")
        with pytest.raises(DuplicateEventId):
            await store.append("s-1", NO_STREAM, [changed], META)

    async def test_partly_known_ids_are_refused(self, store: EventStore) -> None:
        batch = events(2)
        await store.append("s-1", NO_STREAM, batch, META)
        with pytest.raises(DuplicateEventId):
            await store.append("s-1", 2, [batch[1], new_event()], META)
        with pytest.raises(DuplicateEventId):
            await store.append("s-1", 2, [new_event(), batch[0]], META)
        with pytest.raises(DuplicateEventId):
            await store.append("s-1", NO_STREAM, [batch[1], batch[0]], META)  # same ids, other order
        assert await store.stream_version("s-1") == 2

    async def test_same_id_twice_in_one_call_is_refused(self, store: EventStore) -> None:
        event = new_event()
        with pytest.raises(DuplicateEventId):
            await store.append("s-1", NO_STREAM, [event, event], META)
        assert await store.head_position() == 0

    # ---- append_many: all or nothing ------------------------------------------------------------

    async def test_append_many_across_streams(self, store: EventStore) -> None:
        results = await store.append_many(
            [request("a", NO_STREAM, events(2)), request("b", NO_STREAM, events(1)), request("a", 2, events(1))]
        )
        assert [(r.stream_id, r.first_version, r.last_version) for r in results] == [
            ("a", 1, 2),
            ("b", 1, 1),
            ("a", 3, 3),
        ]
        positions = [p for r in results for p in (r.first_position, r.last_position)]
        assert positions == sorted(positions)
        assert [e.stream_id for e in await store.read_all()] == ["a", "a", "b", "a"]

    async def test_append_many_with_one_bad_request_stores_nothing(self, store: EventStore) -> None:
        await store.append("b", NO_STREAM, events(1), META)
        head = await store.head_position()
        with pytest.raises(WrongExpectedVersion):
            await store.append_many([request("a", NO_STREAM, events(2)), request("b", NO_STREAM, events(1))])
        assert await store.head_position() == head
        known = events(1)
        await store.append("c", NO_STREAM, known, META)
        head = await store.head_position()
        with pytest.raises(DuplicateEventId):
            await store.append_many([request("a", NO_STREAM, events(2)), request("d", NO_STREAM, known)])
        assert await store.head_position() == head
        assert await store.stream_version("a") == 0
        assert await store.stream_version("d") == 0

    async def test_append_many_mixes_a_retry_with_new_events(self, store: EventStore) -> None:
        batch = events(1)
        original = await store.append("a", NO_STREAM, batch, META)
        retry, fresh = await store.append_many([request("a", NO_STREAM, batch), request("b", NO_STREAM, events(1))])
        assert retry.duplicate
        assert retry.first_position == original.first_position
        assert not fresh.duplicate
        assert fresh.first_position > original.last_position

    # ---- tracking -------------------------------------------------------------------------------

    async def test_tracking_defaults_to_zero_and_is_recorded(self, store: EventStore) -> None:
        assert await store.get_tracking("relay") == 0
        await store.set_tracking(Tracking(consumer="relay", position=7))
        assert await store.get_tracking("relay") == 7
        await store.set_tracking(Tracking(consumer="relay", position=7))  # same position again: fine
        await store.set_tracking(Tracking(consumer="relay", position=9))
        assert await store.get_tracking("relay") == 9
        assert await store.get_tracking("other") == 0

    async def test_tracking_never_moves_backwards(self, store: EventStore) -> None:
        await store.set_tracking(Tracking(consumer="relay", position=9))
        with pytest.raises(TrackingMovedBackwards) as caught:
            await store.set_tracking(Tracking(consumer="relay", position=8))
        assert (caught.value.current, caught.value.requested) == (9, 8)
        assert await store.get_tracking("relay") == 9

    async def test_tracking_is_written_with_the_append(self, store: EventStore) -> None:
        await store.append("s-1", NO_STREAM, events(1), META, tracking=Tracking(consumer="scheduler", position=3))
        assert await store.get_tracking("scheduler") == 3
        with pytest.raises(WrongExpectedVersion):
            await store.append("s-1", NO_STREAM, events(1), META, tracking=Tracking(consumer="scheduler", position=4))
        assert await store.get_tracking("scheduler") == 3

    async def test_a_backwards_tracking_rolls_back_the_append(self, store: EventStore) -> None:
        await store.set_tracking(Tracking(consumer="scheduler", position=5))
        with pytest.raises(TrackingMovedBackwards):
            await store.append("s-1", NO_STREAM, events(1), META, tracking=Tracking(consumer="scheduler", position=4))
        assert await store.stream_version("s-1") == 0
        assert await store.head_position() == 0

    async def test_a_retried_append_still_moves_the_tracking_row(self, store: EventStore) -> None:
        batch = events(2)
        await store.append("s-1", NO_STREAM, batch, META, tracking=Tracking(consumer="scheduler", position=3))
        # The same events again (all duplicates: no fresh row to carry the tracking), a later position.
        again = await store.append("s-1", NO_STREAM, batch, META, tracking=Tracking(consumer="scheduler", position=6))
        assert again.duplicate
        assert await store.get_tracking("scheduler") == 6
        with pytest.raises(TrackingMovedBackwards):
            await store.append("s-1", NO_STREAM, batch, META, tracking=Tracking(consumer="scheduler", position=5))
        assert await store.get_tracking("scheduler") == 6
