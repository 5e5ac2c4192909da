"""Contracts: the envelope an event travels in, and the shape of an event about to be appended."""

from __future__ import annotations

from datetime import datetime

import msgspec

from verlyard_shared.events import AnyEvent


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """A recorded event: identity, place in its stream and in the global log, who and why."""

    position: int
    """Global position in commit order (gap-free for readers; see docs/adr/0002)."""
    event_id: str
    stream_id: str
    version: int
    """Version of `stream_id` after this event (the first event of a stream is version 1)."""
    recorded_at: datetime
    actor: str
    correlation_id: str
    causation_id: str | None = None
    schema_version: int = 1
    event: AnyEvent


class NewEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event about to be appended. `event_id` makes the append idempotent."""

    event_id: str
    event: AnyEvent


class Metadata(msgspec.Struct, frozen=True, kw_only=True):
    """Who appends and why; shared by every event of one append."""

    actor: str
    correlation_id: str
    causation_id: str | None = None
