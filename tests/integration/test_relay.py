"""The outbox relay against real Postgres and nats-server: order, Msg-Id, kill -9 at random moments, takeover.

Reliability T6 (reduced): published ⊇ committed, nothing duplicated in the stream, position order kept.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from verlyard_api.relay import MSG_ID_HEADER, POSITION_HEADER, OutboxRelay
from verlyard_shared import codec
from verlyard_shared.embedded.nats import EmbeddedNats
from verlyard_shared.envelope import Metadata, NewEvent
from verlyard_shared.events import PipelineCancelRequested, event_type
from verlyard_shared.ids import new_id, pipeline_stream
from verlyard_shared.nats_topology import connect_nats, ensure_topology
from verlyard_shared.store.port import ANY, Tracking
from verlyard_shared.store.postgres import PostgresEventStore
from verlyard_shared.subjects import EVENTS_ALL, STREAM_EVENTS, event_subject

ROOT = Path(__file__).resolve().parents[2]


async def _until(check: Callable[[], Awaitable[bool]], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def _append(
    store: PostgresEventStore, appends: int, *, per_append: int = 1, pipelines: int = 7, pause_s: float = 0.0
) -> int:
    """`appends` appends of `per_append` events each, spread over a few pipeline streams."""
    ids = [new_id() for _ in range(pipelines)]
    for n in range(appends):
        pipeline = ids[n % pipelines]
        events = [
            NewEvent(event_id=new_id(), event=PipelineCancelRequested(pipeline_id=pipeline, reason=f"r{n}.{k}"))
            for k in range(per_append)
        ]
        await store.append(pipeline_stream(pipeline), ANY, events, Metadata(actor="test", correlation_id=pipeline))
        if pause_s:
            await asyncio.sleep(pause_s)
    return appends * per_append


async def _stream_messages(js: JetStreamContext) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """Every message of the events stream as (subject, msg id, body, headers), read by a fresh ordered consumer."""
    info = await js.stream_info(STREAM_EVENTS)
    total = info.state.messages
    out: list[tuple[str, str, bytes, dict[str, str]]] = []
    if total == 0:
        return out
    sub = await js.subscribe(EVENTS_ALL, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    try:
        while len(out) < total:
            msg = await sub.next_msg(timeout=10)
            headers = msg.headers or {}
            out.append((msg.subject, headers.get(MSG_ID_HEADER, ""), msg.data, headers))
    finally:
        await sub.unsubscribe()
    return out


async def _last_published_position(js: JetStreamContext) -> int:
    info = await js.stream_info(STREAM_EVENTS)
    if info.state.messages == 0:
        return 0
    last = await js.get_msg(STREAM_EVENTS, seq=info.state.last_seq)
    return int((last.headers or {})[POSITION_HEADER])


async def _assert_stream_equals_log(js: JetStreamContext, store: PostgresEventStore) -> int:
    committed = await store.read_all(after=0, limit=1_000_000)
    messages = await _stream_messages(js)
    ids = [msg_id for _, msg_id, _, _ in messages]
    expected = [e.event_id for e in committed]
    missing = set(expected) - set(ids)
    assert not missing, f"{len(missing)} committed events never published"
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicates in the stream"
    assert ids == expected, "the stream is not in position order"
    return len(ids)


@pytest.fixture
async def relay_task(pg_pool: asyncpg.Pool, js: JetStreamContext) -> AsyncIterator[Callable[..., OutboxRelay]]:
    """Start in-process relays; each is stopped (gracefully) after the test."""
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    def start(**kwargs: object) -> OutboxRelay:
        relay = OutboxRelay(pg_pool, js, **kwargs)  # type: ignore[arg-type]
        stop = asyncio.Event()
        running.append((stop, asyncio.create_task(relay.run(stop))))
        return relay

    try:
        yield start
    finally:
        for stop, _ in running:
            stop.set()
        for _, task in running:
            await asyncio.wait_for(task, 15)


async def test_events_are_published_in_order_with_msg_id(
    pg_store: PostgresEventStore, js: JetStreamContext, relay_task: Callable[..., OutboxRelay]
) -> None:
    # Given events committed before the relay starts, and more while it runs
    await _append(pg_store, 40, per_append=3)
    relay = relay_task(batch_size=50, poll_interval_s=30.0)
    await _append(pg_store, 60)
    head = await pg_store.head_position()
    # When it catches up
    await _until(lambda: _at(pg_store, head), timeout=30, what="the relay to reach the head")
    # Then the stream is the log: same ids, same order, one message each, subject by stream and type
    assert await _assert_stream_equals_log(js, pg_store) == 180
    committed = {e.event_id: e for e in await pg_store.read_all(after=0, limit=1000)}
    for subject, msg_id, body, headers in await _stream_messages(js):
        envelope = committed[msg_id]
        assert subject == event_subject(envelope.stream_id, event_type(envelope.event))
        assert codec.decode_envelope(body) == envelope
        assert headers[POSITION_HEADER] == str(envelope.position)
    assert relay.lag.behind == 0
    assert relay.lag.position == head

    # And a commit while idle is published on its NOTIFY, well before the 30 s poll.
    started = time.monotonic()
    await _append(pg_store, 1)
    head = await pg_store.head_position()
    await _until(lambda: _at(pg_store, head), timeout=5, what="a NOTIFY-driven publish")
    assert time.monotonic() - started < 2.0
    assert relay.lag.last_latency_s is not None and relay.lag.last_latency_s < 2.0


async def _at(store: PostgresEventStore, position: int, consumer: str = "relay") -> bool:
    return await store.get_tracking(consumer) >= position


async def test_a_republished_batch_is_dropped_as_duplicates(
    pg_store: PostgresEventStore, js: JetStreamContext, relay_task: Callable[..., OutboxRelay]
) -> None:
    # Given a relay that published everything
    await _append(pg_store, 30)
    relay_task(batch_size=10)
    await _until(lambda: _at(pg_store, 30), timeout=30, what="the first pass")
    # When a relay whose recorded position is 10 starts (a crash after publishing, before recording)
    await pg_store.set_tracking(Tracking(consumer="relay-2", position=10))
    second = relay_task(batch_size=7, consumer="relay-2")
    await _until(lambda: _at(pg_store, 30, "relay-2"), timeout=30, what="the second pass")
    # Then JetStream acknowledged the 20 republished events as duplicates and stored each event once
    assert second.lag.duplicates == 20
    assert await _assert_stream_equals_log(js, pg_store) == 30


async def test_a_relay_behind_the_stream_skips_ahead_even_outside_the_duplicate_window(
    pg_store: PostgresEventStore, js: JetStreamContext, relay_task: Callable[..., OutboxRelay]
) -> None:
    # Given a stream holding all 30 events, and a duplicate window that has passed
    await _append(pg_store, 30)
    relay_task(batch_size=10)
    await _until(lambda: _at(pg_store, 30), timeout=30, what="the first pass")
    config = (await js.stream_info(STREAM_EVENTS)).config
    config.duplicate_window = 0.5
    await js.update_stream(config)
    await asyncio.sleep(0.8)
    # When relays recorded at 10 and at 0 start (Msg-Id dedupe can no longer help)
    await pg_store.set_tracking(Tracking(consumer="relay-2", position=10))
    behind = relay_task(batch_size=10, consumer="relay-2")
    fresh = relay_task(batch_size=10, consumer="relay-3")
    await _until(lambda: _at(pg_store, 30, "relay-2"), timeout=30, what="relay-2 to skip ahead")
    await _until(lambda: _at(pg_store, 30, "relay-3"), timeout=30, what="relay-3 to skip ahead")
    # Then their expectations failed, they read the stream's last position and published nothing twice
    assert behind.lag.published == fresh.lag.published == 0
    assert await _assert_stream_equals_log(js, pg_store) == 30


async def test_a_stream_that_lost_messages_is_refilled(
    pg_store: PostgresEventStore, js: JetStreamContext, relay_task: Callable[..., OutboxRelay]
) -> None:
    # Given 30 published events
    await _append(pg_store, 30)
    relay = relay_task(batch_size=10)
    await _until(lambda: _at(pg_store, 30), timeout=30, what="the first pass")
    # When JetStream loses all but the first 10 (a restored volume): recreate the stream with those
    committed = await pg_store.read_all(after=0, limit=100)
    await js.delete_stream(STREAM_EVENTS)
    await ensure_topology(js)
    for envelope in committed[:10]:
        await js.publish(
            event_subject(envelope.stream_id, event_type(envelope.event)),
            codec.encode(envelope),
            headers={MSG_ID_HEADER: envelope.event_id, POSITION_HEADER: str(envelope.position)},
        )
    # And more events are committed
    await _append(pg_store, 5)
    # Then the relay's next publish is refused, it rewinds to position 10 and republishes the rest in order
    await _until(lambda: _at(pg_store, 35), timeout=30, what="the relay to publish the new events")
    await _until(lambda: _stream_has(js, 35), timeout=30, what="the stream to be refilled")
    assert await _assert_stream_equals_log(js, pg_store) == 35
    assert relay.lag.position == 35


async def _stream_has(js: JetStreamContext, count: int) -> bool:
    return (await js.stream_info(STREAM_EVENTS)).state.messages >= count


async def test_relay_keeps_order_and_completeness_across_nats_kills(
    pg_store: PostgresEventStore,
    pg_pool: asyncpg.Pool,
    nats_server_factory: Callable[[], EmbeddedNats],
) -> None:
    # Given a relay on a private nats-server
    server = nats_server_factory()
    nc = await connect_nats(server.url, name="relay-under-test", user=server.user, password=server.password)
    check = await connect_nats(server.url, name="checker", user=server.user, password=server.password)
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        relay = OutboxRelay(pg_pool, js, batch_size=50, ack_timeout_s=2.0)
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run(stop))
        writer = asyncio.create_task(_append(pg_store, 600, per_append=5, pause_s=0.002))
        # When nats-server is killed (SIGKILL) and restarted five times while events are committed
        for _ in range(5):
            await asyncio.sleep(random.uniform(0.2, 0.8))
            server.kill()
            await asyncio.sleep(0.3)
            server.start()
        written = await writer
        head = await pg_store.head_position()
        await _until(lambda: _at(pg_store, head), timeout=60, what="the relay to catch up after the kills")
        stop.set()
        await asyncio.wait_for(task, 15)
        # Then the stream holds every committed event exactly once, in position order
        await _until(lambda: _connected(check), timeout=10, what="the checker to reconnect")
        assert await _assert_stream_equals_log(check.jetstream(), pg_store) == written == head
    finally:
        await nc.close()
        await check.close()


async def _connected(nc: NATS) -> bool:
    return nc.is_connected


# ---- subprocess relays ---------------------------------------------------------------------------


def _relay_env(pg_url: str, nats_server: EmbeddedNats, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERLYARD_")}
    env.update(
        VERLYARD_HOME=str(home),
        VERLYARD_DATABASE_URL=pg_url,
        VERLYARD_NATS_URL=nats_server.url,
        VERLYARD_NATS_USER=nats_server.user,
        VERLYARD_NATS_PASSWORD=nats_server.password,
        VERLYARD_LOG_FORMAT="json",
        VERLYARD_LOG_LEVEL="info",
    )
    return env


@dataclass
class RelayProcess:
    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    async def wait(self, timeout: float = 15) -> int:
        return await asyncio.to_thread(self.proc.wait, timeout)

    async def leading(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        return b'"relay_resumed"' in self.log.read_bytes()


@pytest.fixture
def spawn_relay(pg_url: str, nats_server: EmbeddedNats, tmp_path: Path) -> Iterator[Callable[[], RelayProcess]]:
    """Start `python -m verlyard_api.relay` processes (batch size 50); each is killed after the test."""
    started: list[RelayProcess] = []

    def spawn() -> RelayProcess:
        log_path = tmp_path / f"relay-{len(started)}.log"
        with log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "verlyard_api.relay", "--batch-size", "50"],
                env=_relay_env(pg_url, nats_server, tmp_path),
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        started.append(RelayProcess(proc, log_path))
        return started[-1]

    try:
        yield spawn
    finally:
        for relay in started:
            relay.kill()
            relay.proc.wait()


async def test_relay_killed_at_random_moments_loses_and_duplicates_nothing(
    pg_store: PostgresEventStore, js: JetStreamContext, spawn_relay: Callable[[], RelayProcess]
) -> None:
    rng = random.Random(20261128)
    writers_done = asyncio.Event()

    async def writer(n: int) -> int:
        # Paced over ~15 s, so that every kill lands while there is work in flight.
        written = await _append(pg_store, 300, per_append=rng.randint(2, 4) + n % 2, pipelines=5, pause_s=0.045)
        return written

    # Given four writers appending a few thousand events
    writers = asyncio.gather(*(writer(n) for n in range(4)))
    writers.add_done_callback(lambda _: writers_done.set())
    # When the relay is kill -9'd at random moments, a dozen times, and restarted each time
    kills = 0
    progress: list[tuple[int, int]] = []  # (tracking, head) at each kill
    unrecorded = 0  # kills that left published events whose position was not recorded yet
    while kills < 12 or not writers_done.is_set():
        relay = spawn_relay()
        await asyncio.sleep(rng.uniform(0.6, 1.6))
        relay.proc.send_signal(signal.SIGKILL)
        await relay.wait()
        kills += 1
        tracking = await pg_store.get_tracking("relay")
        progress.append((tracking, await pg_store.head_position()))
        unrecorded += await _last_published_position(js) > tracking
        if kills > 60:
            break
    written = sum(await writers)
    head = await pg_store.head_position()
    assert head == written >= 2000
    # Then a last relay catches up and stops cleanly on SIGTERM
    last = spawn_relay()
    await _until(last.leading, timeout=30, what="the last relay to lead")
    await _until(lambda: _at(pg_store, head), timeout=120, what="the last relay to catch up")
    last.proc.send_signal(signal.SIGTERM)
    assert await last.wait() == 0
    # And every committed event is in the stream exactly once, in position order
    assert await _assert_stream_equals_log(js, pg_store) == written
    # The kills landed while the relay was working (it had published since the previous kill).
    print(f"kills={kills} events={written} kills_between_publish_and_record={unrecorded} progress={progress}")
    trackings = [0] + [tracking for tracking, _ in progress]
    assert sum(b > a for a, b in itertools.pairwise(trackings)) >= 10, progress


async def test_a_standby_relay_waits_for_the_lock_and_takes_over(
    pg_store: PostgresEventStore,
    pg_pool: asyncpg.Pool,
    js: JetStreamContext,
    spawn_relay: Callable[[], RelayProcess],
    relay_task: Callable[..., OutboxRelay],
) -> None:
    # Given a relay process that leads and publishes
    first = spawn_relay()
    await _append(pg_store, 20)
    await _until(lambda: _at(pg_store, 20), timeout=30, what="the first relay to publish")
    # When a second relay starts, it waits on the lock while the first keeps publishing
    standby = relay_task(batch_size=10)
    await asyncio.sleep(1.0)
    assert not standby.is_leader
    await _append(pg_store, 20)
    await _until(lambda: _at(pg_store, 40), timeout=30, what="the first relay to keep publishing")
    assert not standby.is_leader
    assert standby.lag.published == 0
    # And when the first is killed, the standby takes over and publishes what follows
    first.proc.send_signal(signal.SIGKILL)
    await first.wait()
    await asyncio.wait_for(standby.wait_leading(), 10)
    await _append(pg_store, 20)
    await _until(lambda: _at(pg_store, 60), timeout=30, what="the standby to publish")
    assert standby.lag.published >= 20
    assert await _assert_stream_equals_log(js, pg_store) == 60
