"""Pull loops against a real nats-server 2.15.

`fetch_ready`: a message that lands on an open pull request is handed over at once (nats-py's batch
fetch could hold it until the request expired), and what the consumer already holds comes with it,
up to the batch. `OpenPull` (the scheduler's report inbox): one pull request kept open and renewed, a
burst in one write comes as one batch, a lone message at once, nothing lost or reordered across
renewals, the announced rest of a burst waited for, and what the open request still brings after
the last batch handed over by `run_out`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from verlyard_shared.nats_fetch import fetch_ready
from verlyard_shared.nats_pull import BURST_HEADER, OpenPull

STREAM = "FETCHTEST"


@pytest.fixture
async def sub(js: JetStreamContext) -> AsyncIterator[JetStreamContext.PullSubscription]:
    await js.add_stream(name=STREAM, subjects=["fetchtest.>"])
    await js.add_consumer(STREAM, ConsumerConfig(durable_name="reader", ack_policy=AckPolicy.EXPLICIT))
    subscription = await js.pull_subscribe_bind(durable="reader", stream=STREAM)
    try:
        yield subscription
    finally:
        await subscription.unsubscribe()
        await js.delete_stream(STREAM)


async def test_bursts_read_by_a_loop_of_short_requests_arrive_whole_and_in_order(
    js: JetStreamContext, sub: JetStreamContext.PullSubscription
) -> None:
    # Bursts of three a few ms apart, read as the scheduler reads reports (0.5 s requests): every
    # message comes, in order, each once. How soon is bench/fetch_stall.py's question (no timed asserts):
    # nats-py's `fetch(1000, 0.5)` held some messages until their request expired.
    arrived: asyncio.Queue[bytes] = asyncio.Queue()

    async def reader() -> None:
        while True:
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                for msg in await fetch_ready(sub, 1000, 0.5):
                    await msg.ack()
                    arrived.put_nowait(msg.data)

    reading = asyncio.create_task(reader())
    try:
        for n in range(20):
            burst = [f"{n}-{k}".encode() for k in range(3)]
            for k, data in enumerate(burst):
                await js.publish("fetchtest.x", data)
                await asyncio.sleep(0.002 * ((n + k) % 4))
            got = [await asyncio.wait_for(arrived.get(), timeout=10) for _ in burst]
            assert got == burst
            await asyncio.sleep(0.01 + 0.02 * (n % 3))
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading


async def test_what_the_consumer_holds_comes_at_once_up_to_the_batch(
    js: JetStreamContext, sub: JetStreamContext.PullSubscription
) -> None:
    for n in range(5):
        await js.publish("fetchtest.x", str(n).encode())
    first = await fetch_ready(sub, 3, 5.0)
    rest = await fetch_ready(sub, 1000, 5.0)
    assert [m.data for m in first] == [b"0", b"1", b"2"]
    assert [m.data for m in rest] == [b"3", b"4"]
    for msg in first + rest:
        await msg.ack()
    with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
        await fetch_ready(sub, 1000, 0.3)


async def test_a_lone_message_comes_without_waiting_for_more(
    js: JetStreamContext, sub: JetStreamContext.PullSubscription
) -> None:
    await js.publish("fetchtest.x", b"only")
    batch = await asyncio.wait_for(fetch_ready(sub, 1000, 30.0), timeout=10)  # the ask after it ends at once
    assert [m.data for m in batch] == [b"only"]
    await batch[0].ack()
    await js.publish("fetchtest.x", b"next")
    nxt = await asyncio.wait_for(fetch_ready(sub, 1000, 30.0), timeout=10)
    assert [m.data for m in nxt] == [b"next"]  # no status left over from the last ask gets in the way


# ---- OpenPull: the scheduler's report inbox keeps one pull request open ----------------------------


async def test_open_pull_a_burst_in_one_write_comes_as_one_batch(
    nc: NATS, sub: JetStreamContext.PullSubscription
) -> None:
    # As the agent sends a quick stage's reports: in one write, each saying how many follow it. (How
    # long an announced one may be waited for is a latency question; a loaded CI machine gets 5 s.)
    pull = OpenPull(sub, batch=1000, expires_s=30.0, burst_wait_s=5.0)
    for n in range(10):
        waiting = asyncio.create_task(pull.next_batch(30.0))
        await asyncio.sleep(0.05)  # the request is open on the server
        for k in range(3):
            await nc.publish("fetchtest.x", f"{n}-{k}".encode(), headers={BURST_HEADER: str(2 - k)})
        await nc.flush()
        batch = await asyncio.wait_for(waiting, timeout=10)  # never waits out its 30 s
        assert [m.data for m in batch] == [f"{n}-{k}".encode() for k in range(3)]
        for msg in batch:
            await msg.ack()


async def test_open_pull_a_lone_message_comes_at_once_and_nothing_is_lost_across_renewals(
    js: JetStreamContext, sub: JetStreamContext.PullSubscription
) -> None:
    # A short request life (0.2 s) renewed many times; messages come between and across renewals,
    # some while the reader is busy (they wait in the subscription and come with the next batch).
    pull = OpenPull(sub, batch=1000, expires_s=0.2)
    sent: list[bytes] = []
    got: list[bytes] = []
    for n in range(12):
        data = f"m{n}".encode()
        await js.publish("fetchtest.x", data)
        sent.append(data)
        if n % 3 == 0:
            await asyncio.sleep(0.25)  # past the request's life: a renewal comes first
        batch = await asyncio.wait_for(pull.next_batch(30.0), timeout=10)
        got.extend(m.data for m in batch)
        for msg in batch:
            await msg.ack()
    assert got == sent
    with pytest.raises(nats.errors.TimeoutError):
        await pull.next_batch(0.3)  # nothing left, nothing twice


async def test_open_pull_the_batch_limit_holds_and_run_out_hands_over_what_is_left(
    js: JetStreamContext, sub: JetStreamContext.PullSubscription
) -> None:
    pull = OpenPull(sub, batch=3, expires_s=0.5)
    for n in range(5):
        await js.publish("fetchtest.x", str(n).encode())
    batches: list[list[bytes]] = []
    while sum(len(b) for b in batches) < 5:
        batch = await asyncio.wait_for(pull.next_batch(10.0), timeout=20)
        batches.append([m.data for m in batch])
        for msg in batch:
            await msg.ack()
    assert [d for b in batches for d in b] == [str(n).encode() for n in range(5)]
    assert all(1 <= len(b) <= 3 for b in batches), batches
    await js.publish("fetchtest.x", b"late")  # delivered to the open request after the last batch
    left = await asyncio.wait_for(pull.run_out(), timeout=10)
    if not left:  # the request had run out of room or time: the next batch brings it instead
        left = await asyncio.wait_for(pull.next_batch(10.0), timeout=20)
    assert [m.data for m in left] == [b"late"]
    for msg in left:
        await msg.ack()


async def test_open_pull_a_batch_waits_for_the_rest_of_a_burst_its_last_message_announces(
    nc: NATS, sub: JetStreamContext.PullSubscription
) -> None:
    pull = OpenPull(sub, batch=1000, expires_s=30.0, burst_wait_s=2.0)
    waiting = asyncio.create_task(pull.next_batch(30.0))
    await asyncio.sleep(0.05)
    await nc.publish("fetchtest.x", b"accepted", headers={BURST_HEADER: "1"})
    await nc.flush()
    await asyncio.sleep(0.2)  # the agent's second publish is late, but announced
    await nc.publish("fetchtest.x", b"finished", headers={BURST_HEADER: "0"})
    await nc.flush()
    batch = await asyncio.wait_for(waiting, timeout=10)
    assert [m.data for m in batch] == [b"accepted", b"finished"]
    # An announced message that never comes holds the batch at most `burst_wait_s`, then it goes.
    await nc.publish("fetchtest.x", b"lonely", headers={BURST_HEADER: "2"})
    await nc.flush()
    alone = await asyncio.wait_for(pull.next_batch(30.0), timeout=10)
    assert [m.data for m in alone] == [b"lonely"]
    for msg in batch + alone:
        await msg.ack()
