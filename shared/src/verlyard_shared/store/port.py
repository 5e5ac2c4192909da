"""Port: the event store every service appends to and reads from. Postgres is the only record.

Semantics (one contract test suite, `verlyard_shared.testing.store_contract`, holds both adapters to them):
- `append` is atomic per call; `expected_version` is the stream's current version before the append
  (`NO_STREAM` = 0: the stream must not exist; `ANY` = no check). A mismatch raises
  `WrongExpectedVersion` (HTTP 409) and stores nothing.
- Idempotent by event id: appending events whose ids are already stored (same stream, same order)
  returns the original `AppendResult` and stores nothing new; reusing an id elsewhere raises
  `DuplicateEventId`.
- `read_all(after=p)` returns events with position > p in commit order, and never skips an event
  that commits later with a smaller position (docs/adr/0002-event-store-ordering.md).
- `tracking` records a consumer's position in the same transaction as the append (its effects).
  Recording the same position again is fine; a smaller one raises `TrackingMovedBackwards`.
- An append request without events, or with expected_version < ANY, raises ValueError.
- A lost connection raises `StoreUnavailable`; the append may or may not have committed, so callers
  retry with the same event ids (idempotent) and get the original result back.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import msgspec

from verlyard_shared.envelope import Envelope, Metadata, NewEvent

ANY: int = -1
"""expected_version that skips the concurrency check."""
NO_STREAM: int = 0
"""expected_version of a stream that must not exist yet."""


class StoreError(Exception):
    """Base of the event store's typed errors (mapped to HTTP once, at the edge)."""


class WrongExpectedVersion(StoreError):
    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream_id!r} is at version {actual}, expected {expected}")
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class DuplicateEventId(StoreError):
    def __init__(self, event_id: str) -> None:
        super().__init__(f"event id {event_id!r} is already stored with different content or place")
        self.event_id = event_id


class StoreUnavailable(StoreError):
    """The database cannot be reached (HTTP 503 + Retry-After)."""


class TrackingMovedBackwards(StoreError):
    """A consumer tried to record a position below the one it already recorded (a stale or duplicate worker)."""

    def __init__(self, consumer: str, current: int, requested: int) -> None:
        super().__init__(f"consumer {consumer!r} is at position {current}; refusing to move it back to {requested}")
        self.consumer = consumer
        self.current = current
        self.requested = requested


class AppendRequest(msgspec.Struct, frozen=True, kw_only=True):
    stream_id: str
    expected_version: int
    events: tuple[NewEvent, ...]
    metadata: Metadata


class AppendResult(msgspec.Struct, frozen=True, kw_only=True):
    stream_id: str
    first_version: int
    last_version: int
    first_position: int
    last_position: int
    duplicate: bool = False
    """True when every event id was already stored: this is the original append's result."""


class Tracking(msgspec.Struct, frozen=True, kw_only=True):
    """A consumer's position in the global log, written with its effects."""

    consumer: str
    position: int


class EventStore(abc.ABC):
    @abc.abstractmethod
    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[AppendResult]:
        """Append to several streams in one transaction (all or nothing)."""

    async def append(
        self,
        stream_id: str,
        expected_version: int,
        events: Sequence[NewEvent],
        metadata: Metadata,
        *,
        tracking: Tracking | None = None,
    ) -> AppendResult:
        request = AppendRequest(
            stream_id=stream_id, expected_version=expected_version, events=tuple(events), metadata=metadata
        )
        (result,) = await self.append_many([request], tracking=tracking)
        return result

    @abc.abstractmethod
    async def read_stream(self, stream_id: str, *, after_version: int = 0, limit: int | None = None) -> list[Envelope]:
        """Events of one stream with version > after_version, in version order."""

    @abc.abstractmethod
    async def read_all(self, *, after: int = 0, limit: int = 1000) -> list[Envelope]:
        """Events with position > after in commit order, at most `limit`; never skips a late commit."""

    @abc.abstractmethod
    async def stream_version(self, stream_id: str) -> int:
        """Current version of a stream (0 when it does not exist)."""

    @abc.abstractmethod
    async def head_position(self) -> int:
        """Position of the last event a reader may see (0 when empty)."""

    @abc.abstractmethod
    async def get_tracking(self, consumer: str) -> int:
        """A consumer's recorded position (0 when it has none)."""

    @abc.abstractmethod
    async def set_tracking(self, tracking: Tracking) -> None:
        """Record a consumer's position on its own (for consumers whose effects live elsewhere)."""
