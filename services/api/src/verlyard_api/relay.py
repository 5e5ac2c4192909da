"""Adapter: the outbox relay. Tails the events table in commit order and publishes every event to JetStream.

Postgres is the record; JetStream is a copy the relay keeps complete (docs/adr/0001-outbox-relay.md):

- One leader: a session-level `pg_advisory_lock` on a connection the relay keeps for as long as it
  leads. A second relay waits on the lock and takes over when the leader's session ends (crash, kill,
  lost connection). The same connection LISTENs on `verlyard_events`, so a commit wakes the relay at
  once; a poll every `poll_interval_s` covers a lost notification.
- Crash-safe: a batch is read with `read_all(after=tracking)`, published with pipelined acks, and
  only then is the tracking row moved. A crash anywhere republishes at most one batch; JetStream
  drops those duplicates by `Nats-Msg-Id` (= event id) within the stream's duplicate window.
- In order: every publish carries `Nats-Expected-Last-Msg-Id` = the previous event's id, so JetStream
  refuses an event whose predecessor it has not stored (a message lost in a reconnect) rather than
  storing it out of order. NATS checks duplicates before that expectation, so a republished
  duplicate is still acknowledged as one. A relay at position 0 sends `Nats-Expected-Last-Sequence: 0`
  instead. On a refusal the relay reads the stream's last message (its `Vy-Position` header) and
  continues from there: it skips what the stream already holds (no duplicate even outside the
  duplicate window) and republishes what the stream lost.

`python -m verlyard_api.relay` runs a relay on its own (VERLYARD_DATABASE_URL, VERLYARD_NATS_*).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from verlyard_shared import codec
from verlyard_shared.envelope import Envelope
from verlyard_shared.events import event_type
from verlyard_shared.store.port import EventStore, StoreError, Tracking
from verlyard_shared.store.postgres import NOTIFY_CHANNEL, PostgresEventStore
from verlyard_shared.subjects import STREAM_EVENTS, event_subject

log = structlog.get_logger("verlyard.relay")

MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_LAST_MSG_ID_HEADER = "Nats-Expected-Last-Msg-Id"
EXPECTED_LAST_SEQUENCE_HEADER = "Nats-Expected-Last-Sequence"
EXPECTED_STREAM_HEADER = "Nats-Expected-Stream"
POSITION_HEADER = "Vy-Position"
"""The event's global position, on every message of the events stream."""

WRONG_LAST_MSG_ID = 10070
"""JetStream error: `Nats-Expected-Last-Msg-Id` does not name the stream's last message."""
WRONG_LAST_SEQUENCE = 10071
"""JetStream error: `Nats-Expected-Last-Sequence` is not the stream's last sequence."""

_START = "\x00start"
"""Anchor of a relay at position 0: the stream must be empty (no event id can hold NUL in Postgres)."""

_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"


class LeadershipLost(Exception):
    """The connection holding the advisory lock is gone: another relay may lead now."""


class PublishFailed(Exception):
    """JetStream did not acknowledge part of a batch (timeout, lost connection, missing stream)."""


class PublishRejected(Exception):
    """JetStream answered a publish with an error (e.g. a failed `Nats-Expected-*` check)."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"jetstream rejected the publish: {code}/{err_code} {description}")
        self.code = code
        self.err_code = err_code
        self.description = description


@dataclass(frozen=True)
class Ack:
    seq: int
    duplicate: bool


class _Publisher:
    """Pipelined JetStream publishes whose acks are matched to futures by reply subject.

    Not nats-py's `publish_async`: its futures never resolve when JetStream answers with an error
    (nats-io/nats.py#985), which is exactly the answer the ordering check relies on.
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix: str | None = None
        self._sub: Subscription | None = None
        self._futures: dict[str, asyncio.Future[Ack]] = {}
        self._next = 0

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> asyncio.Future[Ack]:
        """Queue one publish (in call order on the connection) and return the future of its ack."""
        if self._prefix is None:
            prefix = self._nc.new_inbox()
            self._sub = await self._nc.subscribe(f"{prefix}.*", cb=self._on_reply)
            self._prefix = prefix
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._futures[token] = future
        future.add_done_callback(lambda _: self._futures.pop(token, None))
        await self._nc.publish(subject, payload, reply=f"{self._prefix}.{token}", headers=headers)
        return future

    async def _on_reply(self, msg: Msg) -> None:
        future = self._futures.get(msg.subject.rsplit(".", 1)[-1])
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(PublishRejected(503, 0, "no responders: the events stream does not exist"))
            return
        try:
            reply: dict[str, Any] = json.loads(msg.data)
            error = reply.get("error")
            if error is not None:
                code, err_code = int(error.get("code", 0)), int(error.get("err_code", 0))
                future.set_exception(PublishRejected(code, err_code, str(error.get("description", ""))))
            else:
                future.set_result(Ack(seq=int(reply["seq"]), duplicate=bool(reply.get("duplicate", False))))
        except (ValueError, KeyError, TypeError) as exc:
            future.set_exception(PublishRejected(0, 0, f"unreadable ack: {exc}"))

    async def close(self) -> None:
        for future in list(self._futures.values()):
            future.cancel()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        self._sub = self._prefix = None


_TRANSIENT: tuple[type[BaseException], ...] = (
    StoreError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
    nats.errors.Error,
    LeadershipLost,
    PublishFailed,
    PublishRejected,
)


@dataclass(frozen=True, kw_only=True)
class RelayLag:
    """How far JetStream trails Postgres, as this relay sees it."""

    leader: bool
    """Whether this relay holds the lock (a standby reports its last known figures)."""
    position: int
    """Last position published and recorded in `tracking`."""
    head: int
    """Highest committed position the relay knows of (from NOTIFY payloads and reads)."""
    behind: int
    """Events committed but not yet published: head - position."""
    last_latency_s: float | None
    """Commit-to-ack time of the last event published (recorded_at to JetStream ack)."""
    p99_latency_s: float | None
    """p99 of the same over the last 4096 events."""
    published: int
    """Events acknowledged by JetStream since start, duplicates included."""
    duplicates: int
    """Acks JetStream flagged as duplicates (republished after a crash or a retry)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


class OutboxRelay:
    """Publishes committed events to the JetStream events stream, in position order, one leader at a time."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        *,
        consumer: str = "relay",
        batch_size: int = 500,
        poll_interval_s: float = 1.0,
        ack_timeout_s: float = 10.0,
        lock_check_interval_s: float = 1.0,
        store: EventStore | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._pool = pool
        self._js = js
        # JetStreamContext keeps its connection private; the relay needs it for pipelined publishes.
        self._publisher = _Publisher(js._nc)  # pyright: ignore[reportPrivateUsage]
        self._consumer = consumer
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._ack_timeout_s = ack_timeout_s
        self._lock_check_interval_s = lock_check_interval_s
        self._store: EventStore = store if store is not None else PostgresEventStore(pool)
        self._log = log.bind(consumer=consumer)
        self._leader = False
        self._position = 0
        self._recorded = 0
        self._head = 0
        self._published = 0
        self._duplicates = 0
        self._latencies: collections.deque[float] = collections.deque(maxlen=4096)
        self._leading = asyncio.Event()

    # ---- figures --------------------------------------------------------------------------------

    @property
    def lag(self) -> RelayLag:
        latencies = sorted(self._latencies)
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None
        head = max(self._head, self._position)
        return RelayLag(
            leader=self._leader,
            position=self._position,
            head=head,
            behind=head - self._position,
            last_latency_s=self._latencies[-1] if self._latencies else None,
            p99_latency_s=p99,
            published=self._published,
            duplicates=self._duplicates,
        )

    @property
    def is_leader(self) -> bool:
        return self._leader

    async def wait_leading(self) -> None:
        """Return once this relay holds the lock (for tests and readiness)."""
        await self._leading.wait()

    # ---- the loop -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set. Postgres or NATS going away is logged and retried, never fatal."""
        self._log.info("relay_started", batch_size=self._batch_size)
        delay = 0.1
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    await self._lead(stop)
                except _TRANSIENT as exc:
                    if time.monotonic() - started > 30.0:
                        delay = 0.1  # a hiccup after a good run: back off from the start again
                    self._log.warning("relay_retrying", error=type(exc).__name__, detail=str(exc)[:300], in_s=delay)
                    await _sleep_or_stop(stop, delay)
                    delay = min(delay * 2, 5.0)
        except asyncio.CancelledError:
            raise
        except BaseException:
            self._log.exception("relay_crashed")
            raise
        finally:
            self._leader = False
            self._leading.clear()
            await self._publisher.close()
        self._log.info("relay_stopped", position=self._position)

    async def _lead(self, stop: asyncio.Event) -> None:
        async with self._pool.acquire() as conn:
            if not await self._take_lock(conn, stop):
                return
            wake = asyncio.Event()
            lost = asyncio.Event()

            def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
                # The payload is the last position of a committed append: the head, for free.
                with contextlib.suppress(ValueError):
                    self._head = max(self._head, int(payload))
                wake.set()

            def on_terminate(_conn: object) -> None:
                lost.set()
                wake.set()

            await conn.add_listener(NOTIFY_CHANNEL, on_notify)
            conn.add_termination_listener(on_terminate)
            self._leader = True
            self._leading.set()
            try:
                await self._relay(conn, stop, wake, lost)
            finally:
                self._leader = False
                self._leading.clear()
                conn.remove_termination_listener(on_terminate)
                if not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.remove_listener(NOTIFY_CHANNEL, on_notify)
                    # Releasing to the pool resets the session; unlock explicitly so a standby moves now.
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.execute("SELECT pg_advisory_unlock_all()"), 5)
                self._log.info("relay_stepped_down", position=self._position)

    async def _take_lock(self, conn: Any, stop: asyncio.Event) -> bool:
        """Wait for the leader lock; False when `stop` is set first."""
        waiting_logged = False
        while not stop.is_set():
            if await conn.fetchval(_LOCK_SQL, f"verlyard.relay:{self._consumer}"):
                self._log.info("relay_leading")
                return True
            if not waiting_logged:
                self._log.info("relay_waiting_for_lock")
                waiting_logged = True
            await _sleep_or_stop(stop, 0.2)
        return False

    async def _relay(self, conn: Any, stop: asyncio.Event, wake: asyncio.Event, lost: asyncio.Event) -> None:
        position = await self._store.get_tracking(self._consumer)
        self._position = self._recorded = position
        anchor = await self._event_id_at(position)
        self._log.info("relay_resumed", position=position)
        checked = time.monotonic()
        while not stop.is_set():
            if lost.is_set() or conn.is_closed():
                raise LeadershipLost("the advisory-lock connection closed")
            if time.monotonic() - checked > self._lock_check_interval_s:
                # A live session still holds its lock; a dead one may have let a standby in.
                await asyncio.wait_for(conn.fetchval("SELECT 1"), 5)
                checked = time.monotonic()
            wake.clear()  # before reading: a commit landing during the read wakes the next wait
            batch = await self._store.read_all(after=position, limit=self._batch_size)
            if not batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_first(wake, stop), timeout=self._poll_interval_s)
                continue
            position, anchor = await self._publish(batch, anchor)

    async def _event_id_at(self, position: int) -> str | None:
        """Id of the event at `position`: what JetStream's last message should be when resuming there."""
        if position <= 0:
            return _START
        rows = await self._store.read_all(after=position - 1, limit=1)
        return rows[0].event_id if rows and rows[0].position == position else None

    async def _publish(self, batch: Sequence[Envelope], anchor: str | None) -> tuple[int, str | None]:
        """Publish `batch` with pipelined acks; record the acknowledged prefix; return (position, anchor)."""
        futures: list[asyncio.Future[Ack]] = []
        previous = anchor
        for envelope in batch:
            headers = {MSG_ID_HEADER: envelope.event_id, POSITION_HEADER: str(envelope.position)}
            if previous == _START:
                # NATS checks this before duplicates: a stream that already holds events sends us to _resync.
                headers[EXPECTED_LAST_SEQUENCE_HEADER] = "0"
            elif previous is not None:
                headers[EXPECTED_LAST_MSG_ID_HEADER] = previous
            headers[EXPECTED_STREAM_HEADER] = STREAM_EVENTS
            futures.append(
                await self._publisher.publish(
                    event_subject(envelope.stream_id, event_type(envelope.event)), codec.encode(envelope), headers
                )
            )
            previous = envelope.event_id
        outcomes = await self._acks(futures)
        acked = 0
        now = time.time()
        for envelope, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                break
            acked += 1
            if outcome.duplicate:
                self._duplicates += 1
            self._latencies.append(max(0.0, now - envelope.recorded_at.timestamp()))
        self._published += acked
        position = self._position
        if acked:
            position = batch[acked - 1].position
            anchor = batch[acked - 1].event_id
            await self._record(position)
        if acked == len(batch):
            return position, anchor
        error = outcomes[acked]
        assert isinstance(error, BaseException)
        if isinstance(error, PublishRejected) and error.err_code in (WRONG_LAST_MSG_ID, WRONG_LAST_SEQUENCE):
            resumed = await self._resync(position)
            return resumed, None
        raise PublishFailed(f"event at position {batch[acked].position}: {type(error).__name__}: {error}") from error

    async def _acks(self, futures: Sequence[asyncio.Future[Ack]]) -> list[Ack | BaseException]:
        if futures:
            _, pending = await asyncio.wait(futures, timeout=self._ack_timeout_s)
            for future in pending:
                future.cancel()  # the message may still land: a republish is then a duplicate
        outcomes: list[Ack | BaseException] = []
        for future in futures:
            if future.cancelled():
                outcomes.append(TimeoutError(f"no JetStream ack within {self._ack_timeout_s}s"))
            elif (exc := future.exception()) is not None:
                outcomes.append(exc)
            else:
                outcomes.append(future.result())
        return outcomes

    async def _record(self, position: int) -> None:
        self._position = position
        self._head = max(self._head, position)
        if position > self._recorded:  # after a rewind, tracking stays put until we pass it again
            await self._store.set_tracking(Tracking(consumer=self._consumer, position=position))
            self._recorded = position

    async def _resync(self, position: int) -> int:
        """JetStream's last message is not our predecessor: continue from what the stream really holds."""
        info = await self._js.stream_info(STREAM_EVENTS)
        if info.state.messages == 0:
            # Expired (max_age) or a new stream: nothing to chain on; carry on from our position.
            self._log.warning("relay_stream_empty", position=position)
            return position
        last_msg = await self._js.get_msg(STREAM_EVENTS, seq=info.state.last_seq)
        raw = (last_msg.headers or {}).get(POSITION_HEADER)
        if raw is None:
            self._log.error("relay_foreign_last_message", seq=info.state.last_seq, position=position)
            return position
        last = int(raw)
        if last < position:
            # JetStream lost acknowledged messages (restored volume, lost disk): republish them.
            self._log.warning("relay_rewind", position=position, stream_last=last)
        elif last > position:
            self._log.warning("relay_skip_ahead", position=position, stream_last=last)
        await self._record(last)
        return last


async def _first(*events: asyncio.Event) -> None:
    """Return when any of `events` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


# ---- `python -m verlyard_api.relay` --------------------------------------------------------------


async def _serve(consumer: str, batch_size: int) -> None:
    from verlyard_shared.nats_topology import connect_nats, ensure_topology, nats_tls
    from verlyard_shared.runtime import retry_until, stop_on_signals
    from verlyard_shared.settings import load_settings
    from verlyard_shared.store.postgres import connect_pool

    settings = load_settings()
    if settings.database_url is None or settings.nats_url is None:
        raise SystemExit("verlyard relay: VERLYARD_DATABASE_URL and VERLYARD_NATS_URL must be set")
    database_url, nats_url = settings.database_url, settings.nats_url
    stop = asyncio.Event()
    stop_on_signals(stop)
    pool = await retry_until("postgres", lambda: connect_pool(database_url, min_size=1, max_size=4), stop)
    if pool is None:
        return
    try:
        nc = await retry_until(
            "nats",
            lambda: connect_nats(
                nats_url,
                name=f"verlyard-relay-{consumer}",
                user=settings.nats_user,
                password=settings.nats_password,
                creds=settings.nats_creds,
                tls=nats_tls(settings),
            ),
            stop,
        )
        if nc is None:
            return
        try:
            js = nc.jetstream()
            await ensure_topology(js)
            await OutboxRelay(pool, js, consumer=consumer, batch_size=batch_size).run(stop)
        finally:
            await nc.close()
    finally:
        await pool.close()


def main(argv: Sequence[str] | None = None) -> int:
    from verlyard_shared.logging import configure_logging
    from verlyard_shared.settings import load_settings

    parser = argparse.ArgumentParser(prog="python -m verlyard_api.relay", description="verlyard outbox relay")
    parser.add_argument("--consumer", default="relay", help="tracking row and lock name (default: relay)")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args(argv)
    settings = load_settings()
    configure_logging("relay", fmt=settings.log_format, level=settings.log_level)
    asyncio.run(_serve(args.consumer, args.batch_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
