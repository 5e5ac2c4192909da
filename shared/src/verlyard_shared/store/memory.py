"""Adapter (test fake): an in-memory EventStore with the Postgres store's semantics, for unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import msgspec

from verlyard_shared.codec import encode
from verlyard_shared.envelope import Envelope
from verlyard_shared.events import event_type
from verlyard_shared.store.plan import Duplicate, StoredEvent, plan_appends
from verlyard_shared.store.port import (
    AppendRequest,
    AppendResult,
    EventStore,
    Tracking,
    TrackingMovedBackwards,
)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _content(envelope_event: object) -> object:
    # The same plain-JSON view the Postgres store compares (it decodes its jsonb column).
    return msgspec.json.decode(encode(envelope_event))


class InMemoryEventStore(EventStore):
    """Events in a list (position = index + 1); `clock` stamps `recorded_at` (pass a fixed one in tests)."""

    def __init__(self, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self._clock = clock
        self._lock = asyncio.Lock()
        self._log: list[Envelope] = []
        self._by_id: dict[str, Envelope] = {}
        self._streams: dict[str, list[Envelope]] = {}
        self._tracking: dict[str, int] = {}

    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[AppendResult]:
        async with self._lock:
            contents = [[_content(new.event) for new in request.events] for request in requests]
            stored = {
                new.event_id: StoredEvent(
                    stream_id=found.stream_id,
                    version=found.version,
                    position=found.position,
                    content=_content(found.event),
                )
                for request in requests
                for new in request.events
                if (found := self._by_id.get(new.event_id)) is not None
            }
            versions = {request.stream_id: len(self._streams.get(request.stream_id, ())) for request in requests}
            steps = plan_appends(requests, stored=stored, versions=versions, contents=contents)
            if tracking is not None:
                self._check_tracking(tracking)

            # Nothing below can fail: the call is all or nothing.
            now = self._clock()
            results: list[AppendResult] = []
            for request, step in zip(requests, steps, strict=True):
                if isinstance(step, Duplicate):
                    results.append(step.result)
                    continue
                stream = self._streams.setdefault(request.stream_id, [])
                first_position = len(self._log) + 1
                for offset, new in enumerate(request.events):
                    envelope = Envelope(
                        position=len(self._log) + 1,
                        event_id=new.event_id,
                        stream_id=request.stream_id,
                        version=step.first_version + offset,
                        recorded_at=now,
                        actor=request.metadata.actor,
                        correlation_id=request.metadata.correlation_id,
                        causation_id=request.metadata.causation_id,
                        event=new.event,
                    )
                    self._log.append(envelope)
                    self._by_id[new.event_id] = envelope
                    stream.append(envelope)
                results.append(
                    AppendResult(
                        stream_id=request.stream_id,
                        first_version=step.first_version,
                        last_version=step.first_version + len(request.events) - 1,
                        first_position=first_position,
                        last_position=len(self._log),
                    )
                )
            if tracking is not None:
                self._tracking[tracking.consumer] = tracking.position
            return results

    async def read_stream(self, stream_id: str, *, after_version: int = 0, limit: int | None = None) -> list[Envelope]:
        events = [e for e in self._streams.get(stream_id, ()) if e.version > after_version]
        return events if limit is None else events[:limit]

    async def read_all(self, *, after: int = 0, limit: int = 1000) -> list[Envelope]:
        # Positions are index + 1 and every append is atomic under the lock: a slice is gap-free.
        start = max(after, 0)
        return self._log[start : start + max(limit, 0)]

    async def stream_version(self, stream_id: str) -> int:
        return len(self._streams.get(stream_id, ()))

    async def head_position(self) -> int:
        return len(self._log)

    async def get_tracking(self, consumer: str) -> int:
        return self._tracking.get(consumer, 0)

    async def set_tracking(self, tracking: Tracking) -> None:
        async with self._lock:
            self._check_tracking(tracking)
            self._tracking[tracking.consumer] = tracking.position

    def _check_tracking(self, tracking: Tracking) -> None:
        if tracking.position < 0:
            raise ValueError(f"tracking position {tracking.position} is negative")
        current = self._tracking.get(tracking.consumer, 0)
        if tracking.position < current:
            raise TrackingMovedBackwards(tracking.consumer, current, tracking.position)

    def event_types(self) -> list[str]:
        """The `type` tag of every stored event, in position order (handy in Given/When/Then tests)."""
        return [event_type(e.event) for e in self._log]
