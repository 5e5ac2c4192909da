"""Adapter: the projector. Tails the event log and keeps the read models (pipelines, stages, attempts,
tokens) in step with it, writing the rows AND its `tracking` row in one transaction.

Load -> pure (`verlyard_api.projector`) -> apply, per batch. Each batch transaction first locks the
projector's tracking row (`FOR UPDATE`), so projectors in several API processes take turns and a
batch is applied exactly once: the rows and the position commit together or not at all. Appends are
serialised (ADR 0002), so reading `position > tracked` in commit order never skips a late commit.
Handlers call `catch_up(until=<their append's position>)` before answering, so a client reads its
own writes (docs/adr/0007-api-read-models.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Final

import asyncpg
import msgspec
import structlog

from verlyard_api.adapters.pg import guarded
from verlyard_api.adapters.pg_listen import Wakeup
from verlyard_api.adapters.pg_rows import (
    EVENT_COLUMNS,
    Conn,
    assemble,
    envelope_from_row,
    load_views,
    token_from_row,
    write_changes,
)
from verlyard_api.projector import Projection, RowChange, TokenRow, diff, pipeline_id_of, project_batch
from verlyard_api.verify import Difference, compare
from verlyard_api.viewcache import ViewCache
from verlyard_api.views import PipelineView
from verlyard_shared.store.port import StoreUnavailable

log = structlog.get_logger("verlyard.api.projector")

CONSUMER: Final = "projector"
"""The projector's row in `tracking`."""
BATCH: Final = 500
ADMIN_TIMEOUT_S: Final = 600.0
"""Rebuild and verify read the whole log: they get minutes, not the request budget."""
READ_MODEL_TABLES: Final = ("attempts", "stages", "pipelines", "tokens")
REBUILDS: Final = "projector-rebuilds"
"""A `tracking` row counting read-model rebuilds (its position is the count, not a log position)."""
FORGET_SCAN_MAX: Final = 10_000
"""Positions projected elsewhere beyond which the view cache is cleared rather than scanned."""


class VerifyReport(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of comparing the stored read models with a replay of the log up to `position`."""

    position: int
    pipelines: int
    tokens: int
    differences: list[Difference]


class PgProjector:
    def __init__(self, pool: asyncpg.Pool, *, batch: int = BATCH, wakeup: Wakeup | None = None) -> None:
        self._pool = pool
        self._batch = batch
        self._lock = asyncio.Lock()
        self.views = ViewCache()
        """Pipeline views as stored, kept exact by `_step` (docs/adr/0018-pipeline-view-cache.md)."""
        self._rebuilds = 0
        """The rebuild count (`tracking` row `REBUILDS`) the cache was last checked against."""
        self.position = 0
        """The highest position known to be projected (by this process or another)."""
        self.wakeup = wakeup or Wakeup()
        """Notified by the event listener when appends commit."""

    # ---- catching up ------------------------------------------------------------------------------------

    async def catch_up(self, until: int | None = None) -> int:
        """Project until `until` is applied (default: until the log's end); returns the projected position."""
        if until is not None and self.position >= until:
            return self.position
        async with self._lock:
            while until is None or self.position < until:
                if await self._step() == 0:
                    break
        return self.position

    async def _step(self) -> int:
        """One batch in one transaction; returns how many events it applied."""
        async with guarded(), self._pool.acquire() as conn, conn.transaction():
            tracked, rebuilds = await _lock_tracking(conn)
            if rebuilds != self._rebuilds:  # another process rewrote every row: nothing cached holds
                self.views.clear()
                self._rebuilds = rebuilds
            if tracked != self.position:
                await self._forget_elsewhere(conn, tracked)
            rows = await conn.fetch(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2",
                tracked,
                self._batch,
            )
            if not rows:
                self.position = max(self.position, tracked)
                return 0
            envelopes = [envelope_from_row(row) for row in rows]
            ids = sorted({pid for e in envelopes if (pid := pipeline_id_of(e.stream_id)) is not None})
            # Under the tracking row's lock, after `_forget_elsewhere`, a cached view is the stored row.
            loaded = {pid: view for pid in ids if (view := self.views.peek(pid)) is not None}
            loaded |= await load_views(conn, [pid for pid in ids if pid not in loaded])
            views, tokens = project_batch(loaded, envelopes)
            changes: list[RowChange] = [c for pid, view in views.items() for c in diff(loaded.get(pid), view)]
            changes.extend(TokenRow(token=token) for token in tokens)
            await write_changes(conn, changes)
            last = envelopes[-1].position
            await conn.execute(
                "UPDATE tracking SET position = $2, updated_at = now() WHERE consumer = $1", CONSUMER, last
            )
        self.views.put(views.values())
        self.position = max(self.position, last)
        return len(rows)

    async def _forget_elsewhere(self, conn: Conn, tracked: int) -> None:
        """Another process projected (position, tracked]: drop the cached views of what it changed."""
        if tracked < self.position or tracked - self.position > FORGET_SCAN_MAX:
            self.views.clear()  # a rebuilt or restored database, or a long absence: start afresh
        else:
            rows = await conn.fetch(
                "SELECT DISTINCT stream_id FROM events WHERE position > $1 AND position <= $2", self.position, tracked
            )
            self.views.drop(pid for row in rows if (pid := pipeline_id_of(row["stream_id"])) is not None)
        self.position = tracked

    async def view(self, pipeline_id: str) -> PipelineView | None:
        """A pipeline's stored view: from the cache, else read (and offered to the cache)."""
        view = self.views.get(pipeline_id)
        if view is not None:
            return view
        stamp = self.views.stamp()
        async with guarded():
            view = (await load_views(self._pool, [pipeline_id])).get(pipeline_id)
        if view is not None:
            self.views.offer(view, stamp)
        return view

    async def run(self, stop: asyncio.Event, *, poll_s: float = 1.0) -> None:
        """The background task: catch up whenever appends commit (or every `poll_s`), until `stop`."""
        delay = 0.2
        log.info("projector_started")
        while not stop.is_set():
            armed = self.wakeup.arm()
            try:
                await self.catch_up()
                delay = 0.2
            except StoreUnavailable as exc:
                log.warning("projector_waiting_for_postgres", error=str(exc), retry_in_s=delay)
                await _sleep_or_stop(stop, delay)
                delay = min(delay * 2, 5.0)
                continue
            except Exception:
                # A bug (an event the projector cannot apply): stay on it, loudly, rather than skip it.
                log.exception("projector_failed", position=self.position, retry_in_s=delay)
                await _sleep_or_stop(stop, delay)
                delay = min(delay * 2, 30.0)
                continue
            stopped = asyncio.ensure_future(stop.wait())
            woken = asyncio.ensure_future(Wakeup.wait(armed, poll_s))
            try:
                await asyncio.wait([stopped, woken], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                woken.cancel()
        log.info("projector_stopped", position=self.position)

    # ---- replay -----------------------------------------------------------------------------------------

    async def verify(self) -> VerifyReport:
        """Replay the log up to the projector's position in memory and compare with the stored rows.

        One REPEATABLE READ snapshot covers the tracking row, the events and the tables, so a projector
        committing meanwhile cannot make a false difference.
        """
        async with (
            guarded(ADMIN_TIMEOUT_S),
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            position = int(await conn.fetchval("SELECT position FROM tracking WHERE consumer = $1", CONSUMER) or 0)
            expected = await _replay(conn, position, self._batch)
            found = await _stored(conn)
        found.position = position
        return VerifyReport(
            position=position,
            pipelines=len(expected.pipelines),
            tokens=len(expected.tokens),
            differences=compare(expected, found),
        )

    async def rebuild(self) -> VerifyReport:
        """Replace every read-model row with a replay of the whole log, in one transaction (readers see
        the old rows until it commits). `token_secrets` is not a projection and is kept."""
        async with self._lock:
            async with guarded(ADMIN_TIMEOUT_S), self._pool.acquire() as conn, conn.transaction():
                await _lock_tracking(conn)
                head = int(await conn.fetchval("SELECT coalesce(max(position), 0) FROM events"))
                replayed = await _replay(conn, head, self._batch)
                for table in READ_MODEL_TABLES:
                    await conn.execute(f"DELETE FROM {table}")
                changes: list[RowChange] = [c for view in replayed.pipelines.values() for c in diff(None, view)]
                changes.extend(TokenRow(token=token) for token in replayed.tokens.values())
                await write_changes(conn, changes)
                await conn.execute(
                    "UPDATE tracking SET position = $2, updated_at = now() WHERE consumer = $1", CONSUMER, head
                )
                # Counted so every API process's projector clears its view cache at its next step.
                self._rebuilds = int(
                    await conn.fetchval(
                        "INSERT INTO tracking (consumer, position) VALUES ($1, 1) ON CONFLICT (consumer) "
                        "DO UPDATE SET position = tracking.position + 1, updated_at = now() RETURNING position",
                        REBUILDS,
                    )
                )
            self.position = max(self.position, head)
            self.views.clear()
        log.info("read_models_rebuilt", position=head, pipelines=len(replayed.pipelines))
        return VerifyReport(
            position=head, pipelines=len(replayed.pipelines), tokens=len(replayed.tokens), differences=[]
        )


_LOCK_TRACKING = """
SELECT position, (SELECT position FROM tracking WHERE consumer = $2) AS rebuilds
FROM tracking WHERE consumer = $1 FOR UPDATE
"""


async def _lock_tracking(conn: Conn) -> tuple[int, int]:
    """Lock the projector's tracking row for this transaction (creating it at position 0 the first time);
    returns its position and the rebuild count."""
    row = await conn.fetchrow(_LOCK_TRACKING, CONSUMER, REBUILDS)
    if row is None:
        await conn.execute(
            "INSERT INTO tracking (consumer, position) VALUES ($1, 0) ON CONFLICT (consumer) DO NOTHING", CONSUMER
        )
        row = await conn.fetchrow(_LOCK_TRACKING, CONSUMER, REBUILDS)
    assert row is not None, "the row exists now"
    return int(row["position"]), int(row["rebuilds"] or 0)


async def _replay(conn: Conn, until: int, batch: int) -> Projection:
    projection = Projection()
    after = 0
    while after < until:
        rows: Sequence[asyncpg.Record] = await conn.fetch(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3",
            after,
            until,
            max(batch, 1000),
        )
        if not rows:
            break
        for row in rows:
            projection.apply(envelope_from_row(row))
        after = rows[-1]["position"]
    return projection


async def _stored(conn: Conn) -> Projection:
    pipelines = await conn.fetch("SELECT * FROM pipelines")
    stages = await conn.fetch("SELECT * FROM stages ORDER BY pipeline_id, ordinal")
    attempts = await conn.fetch("SELECT * FROM attempts ORDER BY pipeline_id, stage, ordinal")
    tokens = await conn.fetch("SELECT * FROM tokens")
    return Projection(
        pipelines=assemble(pipelines, stages, attempts),
        tokens={row["id"]: token_from_row(row) for row in tokens},
    )


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
