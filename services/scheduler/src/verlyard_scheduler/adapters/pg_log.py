"""Adapter: read the event log for the scheduler's fold: the live part of it on start, then the tail.

The scheduler folds the Postgres log itself, not JetStream's copy: it needs the gap-free, ordered
record (ADR 0002) and it is where its own appends land (docs/adr/0006-scheduler-service.md).

Start-up reads only what can still change. In one REPEATABLE READ snapshot it finds the head
position and, with one scan that never reads an event's data, every pipeline and agent stream with
the version of its last end (`pipeline.succeeded|failed|cancelled`) and of its last retry request.
A pipeline whose last end comes after its last retry request is finished (only a retry request can
revive it, and then the service reads the stream again); the other streams are read whole, through
the (stream_id, version) index. The tail then continues from the snapshot's head, so nothing
committed after the snapshot is missed and nothing before it is folded twice.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import msgspec

from verlyard_shared.codec import decode_event
from verlyard_shared.envelope import Envelope
from verlyard_shared.store.port import EventStore

_HEAD = "SELECT coalesce(max(position), 0) FROM events"

_STREAMS = """
SELECT stream_id,
       max(version) FILTER (WHERE type IN ('pipeline.succeeded', 'pipeline.failed', 'pipeline.cancelled')) AS ended,
       max(version) FILTER (WHERE type = 'pipeline.retry_requested') AS retried
FROM events
WHERE position <= $1
  AND (version = 1 OR type IN ('pipeline.succeeded', 'pipeline.failed', 'pipeline.cancelled',
                               'pipeline.retry_requested'))
  AND (stream_id LIKE 'pipeline-%' OR stream_id LIKE 'agent-%')
GROUP BY stream_id
"""

_EVENTS_OF = """
SELECT e.position, e.event_id, e.stream_id, e.version, e.recorded_at, e.actor, e.correlation_id, e.causation_id,
       e.schema_version, e.data
FROM unnest($1::text[]) WITH ORDINALITY AS s(stream_id, n)
CROSS JOIN LATERAL (
    SELECT * FROM events WHERE events.stream_id = s.stream_id ORDER BY events.version
) AS e
WHERE e.position + 0 <= $2
ORDER BY s.n, e.version
"""
"""One (stream_id, version) index range scan per stream (LATERAL): `stream_id = ANY(2000 ids)` let the
planner scan the whole log per batch, seconds on a million events (bench R1). The head bound is kept
out of the index conditions (`+ 0`), or the planner ANDs in a range scan of the position index; inside
the load's REPEATABLE READ snapshot it never removes a row anyway (head is the snapshot's max)."""


def live(ended: int | None, retried: int | None) -> bool:
    """A pipeline stream can still change unless its last end comes after its last retry request."""
    return ended is None or (retried is not None and retried > ended)


def _envelope(row: asyncpg.Record) -> Envelope:
    return Envelope(
        position=row[0],
        event_id=row[1],
        stream_id=row[2],
        version=row[3],
        recorded_at=row[4],
        actor=row[5],
        correlation_id=row[6],
        causation_id=row[7],
        schema_version=row[8],
        event=decode_event(row[9]),
    )


class LiveLoad(msgspec.Struct, frozen=True, kw_only=True):
    head: int
    """The snapshot's last position: the tail continues after it."""
    events: int
    """Events read (of live streams only)."""
    streams: int
    """Streams in the log (pipelines and agents)."""
    live_streams: int
    scan_s: float
    """Time of the snapshot's stream scan (reads no event data)."""
    read_s: float
    """Time spent reading and decoding live streams (folding excluded)."""


async def load_live(
    pool: asyncpg.Pool,
    on_batch: Callable[[Sequence[Envelope]], Awaitable[None]],
    *,
    streams_per_read: int = 2000,
) -> LiveLoad:
    """Feed `on_batch` every event of every live stream (each stream in version order) as of one
    snapshot. `pool` must decode json as text (`verlyard_shared.store.postgres.connect_pool` does)."""
    count = 0
    read_s = 0.0
    started = time.perf_counter()
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        head = int(await conn.fetchval(_HEAD))
        rows = await conn.fetch(_STREAMS, head)
        streams = [
            row["stream_id"]
            for row in rows
            if not row["stream_id"].startswith("pipeline-") or live(row["ended"], row["retried"])
        ]
        scan_s = time.perf_counter() - started
        for start in range(0, len(streams), streams_per_read):
            began = time.perf_counter()
            batch = [
                _envelope(row) for row in await conn.fetch(_EVENTS_OF, streams[start : start + streams_per_read], head)
            ]
            read_s += time.perf_counter() - began
            count += len(batch)
            await on_batch(batch)
    return LiveLoad(head=head, events=count, streams=len(rows), live_streams=len(streams), scan_s=scan_s, read_s=read_s)


async def read_log(store: EventStore, *, after: int, limit: int) -> list[Envelope]:
    """Envelopes with position > `after`, in commit order, at most `limit` (the tail)."""
    return await store.read_all(after=after, limit=limit)
