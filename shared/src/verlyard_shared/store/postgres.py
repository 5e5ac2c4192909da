"""Adapter: the Postgres event store (asyncpg), the only record of what happened.

Gap-free reading: every append transaction takes `LOCK TABLE events IN EXCLUSIVE MODE` before it
draws positions, so positions commit in order and `read_all(after=p)` can never miss an event that
commits late (docs/adr/0002-event-store-ordering.md). Readers are not blocked: EXCLUSIVE still
admits plain SELECTs.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from verlyard_shared.codec import decode_event, encode
from verlyard_shared.envelope import Envelope
from verlyard_shared.events import event_type
from verlyard_shared.store.plan import Duplicate, Fresh, StoredEvent, plan_appends
from verlyard_shared.store.port import (
    AppendRequest,
    AppendResult,
    DuplicateEventId,
    EventStore,
    StoreUnavailable,
    Tracking,
    TrackingMovedBackwards,
    WrongExpectedVersion,
)

NOTIFY_CHANNEL = "verlyard_events"
"""Channel notified on every committed append; the payload is the last position as text."""

SCHEMA_VERSION = 1
"""`schema_version` stored with new events (bumped with an upcaster when an event shape breaks)."""

Conn = asyncpg.Connection | PoolConnectionProxy

BeforeCommit = Callable[[Sequence[AppendResult]], Awaitable[None]]

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    OSError,  # includes ConnectionError and TimeoutError (command_timeout, connect timeout)
)


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _UNAVAILABLE):
        return True
    # asyncpg reports use of a connection the server dropped as InterfaceError("connection is closed").
    return isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc)


@contextlib.asynccontextmanager
async def _mapped_errors() -> AsyncIterator[None]:
    """Map connection failures to StoreUnavailable, once, here at the edge."""
    try:
        yield
    except BaseException as exc:
        if _is_unavailable(exc):
            raise StoreUnavailable(f"postgres is unavailable: {type(exc).__name__}: {exc}") from exc
        raise


async def _init_connection(conn: Conn) -> None:
    # json/jsonb travel as text both ways: msgspec encodes and decodes them, asyncpg never parses JSON.
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=_identity, decoder=_identity, schema="pg_catalog", format="text")


def _identity(value: str) -> str:
    return value


class PooledConnection(asyncpg.Connection):  # type: ignore[misc]  # asyncpg ships no complete stubs
    """A pooled connection released without asyncpg's reset query (`pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL;`), a round trip on every release: a third of a simple read's time here.

    asyncpg still rolls back an open transaction on release. Nothing else in verlyard leaves session
    state on a pooled connection: the code that LISTENs or takes a session advisory lock on one
    (relay.py, pg_listen.py, pg_tokens.py) undoes it itself before releasing, and no code runs SET,
    cursors or temporary tables outside a transaction.
    """

    def get_reset_query(self) -> str:
        return ""


async def connect_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    command_timeout: float | None = None,
    connect_timeout: float = 5.0,
) -> asyncpg.Pool:
    """An asyncpg pool for `url` with json/jsonb as text; StoreUnavailable when Postgres cannot be reached."""
    async with _mapped_errors():
        pool: asyncpg.Pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            connection_class=PooledConnection,
            command_timeout=command_timeout,
            timeout=connect_timeout,
        )
    return pool


_COLUMNS = (
    "position, event_id, stream_id, version, recorded_at, actor, correlation_id, causation_id, schema_version, data"
)

# Rows are inserted (and positions drawn) in request order; the same statement queues the NOTIFY,
# which Postgres delivers only if and when the transaction commits, and moves the caller's tracking
# row forward ($11 consumer, $12 position; a consumer of NULL skips it), one round trip for all three.
_INSERT = """
WITH inserted AS (
    INSERT INTO events (event_id, stream_id, version, type, schema_version, data, actor, correlation_id, causation_id)
    SELECT e.event_id, e.stream_id, e.version, e.type, e.schema_version, e.data, e.actor, e.correlation_id,
           e.causation_id
    FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::int[], $6::jsonb[], $7::text[], $8::text[],
                $9::text[])
         WITH ORDINALITY AS e(event_id, stream_id, version, type, schema_version, data, actor, correlation_id,
                              causation_id, n)
    ORDER BY e.n
    RETURNING position, event_id
), notified AS (
    SELECT pg_notify($10, max(position)::text) FROM inserted
), tracked AS (
    INSERT INTO tracking (consumer, position) SELECT $11::text, $12::bigint WHERE $11::text IS NOT NULL
    ON CONFLICT (consumer) DO UPDATE SET position = EXCLUDED.position, updated_at = now()
    WHERE tracking.position <= EXCLUDED.position
    RETURNING position
)
SELECT inserted.position, inserted.event_id, (SELECT count(*) FROM tracked) AS tracked FROM inserted, notified
"""

# One round trip for what the plan needs: the call's event ids already stored (event_id set) and
# each stream's current version (event_id NULL), one index probe per stream whatever the table size.
_LOOKUP = """
SELECT event_id, stream_id, version, position, data FROM events WHERE event_id = ANY($1::text[])
UNION ALL
SELECT NULL, s.stream_id, (SELECT max(version) FROM events WHERE stream_id = s.stream_id), NULL, NULL
FROM unnest($2::text[]) AS s(stream_id)
"""

_UPSERT_TRACKING = """
INSERT INTO tracking (consumer, position) VALUES ($1, $2)
ON CONFLICT (consumer) DO UPDATE SET position = EXCLUDED.position, updated_at = now()
WHERE tracking.position <= EXCLUDED.position
RETURNING position
"""


class PostgresEventStore(EventStore):
    """The EventStore port on Postgres. `ordering_guard=False` exists only so a test can prove the guard matters.

    `_before_commit` is a test-only hook: awaited inside the append transaction after the rows are
    inserted and before COMMIT (a test sleeps there to commit late, or raises to roll back).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        ordering_guard: bool = True,
        _before_commit: BeforeCommit | None = None,
    ) -> None:
        self._pool = pool
        self._ordering_guard = ordering_guard
        self._before_commit = _before_commit

    # ---- writes ---------------------------------------------------------------------------------

    async def append_many(
        self, requests: Sequence[AppendRequest], *, tracking: Tracking | None = None
    ) -> list[AppendResult]:
        if tracking is not None and tracking.position < 0:
            raise ValueError(f"tracking position {tracking.position} is negative")
        encoded = [[encode(new.event) for new in request.events] for request in requests]
        # Without the guard, two first-time appends of the same ids can race past the id check; the
        # loser's unique violation means the winner committed, so one more pass finds the duplicate.
        attempts = 1 if self._ordering_guard else 2
        for attempt in range(attempts):
            try:
                async with _mapped_errors(), self._pool.acquire() as conn:
                    return await self._append_in_transaction(conn, requests, encoded, tracking)
            except asyncpg.UniqueViolationError as exc:
                constraint: str | None = getattr(exc, "constraint_name", None)
                detail: str | None = getattr(exc, "detail", None)
                if constraint == "events_stream_version_uq":
                    # Only reachable without the guard: a concurrent append took the version first.
                    request = _request_in_detail(requests, detail)
                    actual = await self.stream_version(request.stream_id)
                    raise WrongExpectedVersion(request.stream_id, request.expected_version, actual) from None
                if constraint == "events_event_id_uq" and attempt + 1 < attempts:
                    continue
                if constraint == "events_event_id_uq":
                    raise DuplicateEventId(_id_in_detail(requests, detail)) from None
                raise
        raise AssertionError("unreachable")

    async def _append_in_transaction(
        self,
        conn: Conn,
        requests: Sequence[AppendRequest],
        encoded: list[list[bytes]],
        tracking: Tracking | None,
    ) -> list[AppendResult]:
        # BEGIN and the lock travel in one round trip (simple protocol); appends are latency-bound.
        # The lock serialises appends so positions are drawn and committed in one order (ADR 0002).
        try:
            await conn.execute("BEGIN; LOCK TABLE events IN EXCLUSIVE MODE" if self._ordering_guard else "BEGIN")
            event_ids = [new.event_id for request in requests for new in request.events]
            streams = list(dict.fromkeys(request.stream_id for request in requests))
            stored: dict[str, StoredEvent] = {}
            versions: dict[str, int] = {}
            for row in await conn.fetch(_LOOKUP, event_ids, streams):
                if row["event_id"] is None:
                    versions[row["stream_id"]] = row["version"] or 0
                else:
                    stored[row["event_id"]] = StoredEvent(
                        stream_id=row["stream_id"],
                        version=row["version"],
                        position=row["position"],
                        content=msgspec.json.decode(row["data"]),
                    )
            contents: list[list[object]] = [[msgspec.json.decode(data) for data in row] for row in encoded]
            steps = plan_appends(requests, stored=stored, versions=versions, contents=contents)
            results, tracked = await self._insert(conn, requests, encoded, steps, tracking)
            if tracking is not None and not tracked:
                # No fresh event to carry it, or the row is ahead of us (this call raises then).
                await self._upsert_tracking(conn, tracking)
            if self._before_commit is not None:
                await self._before_commit(results)
            await conn.execute("COMMIT")
            return results
        except BaseException:
            if not conn.is_closed() and conn.is_in_transaction():
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
            raise

    async def _insert(
        self,
        conn: Conn,
        requests: Sequence[AppendRequest],
        encoded: list[list[bytes]],
        steps: list[Fresh | Duplicate],
        tracking: Tracking | None = None,
    ) -> tuple[list[AppendResult], bool]:
        """The results, and whether `tracking` was stored with the rows (False when not given)."""
        columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [], [])
        event_ids, stream_ids, versions, types, schema_versions, datas, actors, correlations, causations = columns
        for request, step, data in zip(requests, steps, encoded, strict=True):
            if isinstance(step, Duplicate):
                continue
            for offset, (new, raw) in enumerate(zip(request.events, data, strict=True)):
                event_ids.append(new.event_id)
                stream_ids.append(request.stream_id)
                versions.append(step.first_version + offset)
                types.append(event_type(new.event))
                schema_versions.append(SCHEMA_VERSION)
                datas.append(raw.decode())
                actors.append(request.metadata.actor)
                correlations.append(request.metadata.correlation_id)
                causations.append(request.metadata.causation_id)
        positions: dict[str, int] = {}
        tracked = False
        if event_ids:
            consumer, position = (tracking.consumer, tracking.position) if tracking is not None else (None, 0)
            rows = await conn.fetch(_INSERT, *columns, NOTIFY_CHANNEL, consumer, position)
            positions = {row["event_id"]: row["position"] for row in rows}
            tracked = tracking is not None and bool(rows) and rows[0]["tracked"] == 1

        results: list[AppendResult] = []
        for request, step in zip(requests, steps, strict=True):
            if isinstance(step, Duplicate):
                results.append(step.result)
                continue
            results.append(
                AppendResult(
                    stream_id=request.stream_id,
                    first_version=step.first_version,
                    last_version=step.first_version + len(request.events) - 1,
                    first_position=positions[request.events[0].event_id],
                    last_position=positions[request.events[-1].event_id],
                )
            )
        return results, tracked

    async def _upsert_tracking(self, conn: Conn, tracking: Tracking) -> None:
        if tracking.position < 0:
            raise ValueError(f"tracking position {tracking.position} is negative")
        moved = await conn.fetchval(_UPSERT_TRACKING, tracking.consumer, tracking.position)
        if moved is None:
            current = await conn.fetchval("SELECT position FROM tracking WHERE consumer = $1", tracking.consumer)
            raise TrackingMovedBackwards(tracking.consumer, int(current or 0), tracking.position)

    async def set_tracking(self, tracking: Tracking) -> None:
        async with _mapped_errors(), self._pool.acquire() as conn, conn.transaction():
            await self._upsert_tracking(conn, tracking)

    # ---- reads ----------------------------------------------------------------------------------

    async def read_stream(self, stream_id: str, *, after_version: int = 0, limit: int | None = None) -> list[Envelope]:
        async with _mapped_errors():
            rows = await self._pool.fetch(
                f"SELECT {_COLUMNS} FROM events WHERE stream_id = $1 AND version > $2 ORDER BY version LIMIT $3",
                stream_id,
                after_version,
                limit,
            )
        return [_envelope(row) for row in rows]

    async def read_all(self, *, after: int = 0, limit: int = 1000) -> list[Envelope]:
        async with _mapped_errors():
            rows = await self._pool.fetch(
                f"SELECT {_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2", after, max(limit, 0)
            )
        return [_envelope(row) for row in rows]

    async def stream_version(self, stream_id: str) -> int:
        async with _mapped_errors():
            version = await self._pool.fetchval("SELECT max(version) FROM events WHERE stream_id = $1", stream_id)
        return int(version or 0)

    async def head_position(self) -> int:
        async with _mapped_errors():
            position = await self._pool.fetchval("SELECT max(position) FROM events")
        return int(position or 0)

    async def get_tracking(self, consumer: str) -> int:
        async with _mapped_errors():
            position = await self._pool.fetchval("SELECT position FROM tracking WHERE consumer = $1", consumer)
        return int(position or 0)


def _envelope(row: asyncpg.Record) -> Envelope:
    return Envelope(
        position=row["position"],
        event_id=row["event_id"],
        stream_id=row["stream_id"],
        version=row["version"],
        recorded_at=row["recorded_at"],
        actor=row["actor"],
        correlation_id=row["correlation_id"],
        causation_id=row["causation_id"],
        schema_version=row["schema_version"],
        event=decode_event(row["data"]),
    )


def _id_in_detail(requests: Sequence[AppendRequest], detail: str | None) -> str:
    """The event id named in a unique-violation detail ("Key (event_id)=(...) already exists.")."""
    for request in requests:
        for new in request.events:
            if detail and f"=({new.event_id})" in detail:
                return new.event_id
    return requests[0].events[0].event_id


def _request_in_detail(requests: Sequence[AppendRequest], detail: str | None) -> AppendRequest:
    """The request whose stream a unique-violation detail names ("Key (stream_id, version)=(s, 3) ...")."""
    for request in requests:
        if detail and f"=({request.stream_id}, " in detail:
            return request
    return requests[0]
