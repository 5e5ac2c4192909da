"""fetch_ready against a real nats-server 2.15: a message that lands on an open pull request is handed
over at once (nats-py's batch fetch could hold it until the request expired), and what the consumer
already holds comes with it, up to the batch."""

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


@pytest.mark.parametrize("gather", [False, True])
async def test_bursts_read_by_a_loop_of_short_requests_arrive_whole_and_in_order(
    js: JetStreamContext, sub: JetStreamContext.PullSubscription, gather: bool
) -> None:
    # Bursts of three a few ms apart, read as the scheduler reads reports (0.5 s requests): every
    # message comes, in order, each once. How soon is bench/fetch_stall.py's question (no timed asserts):
    # nats-py's `fetch(1000, 0.5)` held some messages until their request expired.
    arrived: asyncio.Queue[bytes] = asyncio.Queue()

    async def reader() -> None:
        while True:
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                for msg in await fetch_ready(sub, 1000, 0.5, gather=gather):
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


async def test_a_burst_in_one_write_comes_as_one_batch(
    nc: NATS, js: JetStreamContext, sub: JetStreamContext.PullSubscription
) -> None:
    # An agent's accepted, started and finished for a quick stage leave in one socket write; the
    # reader's request is already waiting, so the first is delivered alone, possibly before the others
    # are stored. The no-wait ask after it brings the rest: the scheduler commits the three together.
    for _ in range(10):
        waiting = asyncio.create_task(fetch_ready(sub, 1000, 30.0, gather=True))
        await asyncio.sleep(0.05)  # the long poll is open on the server
        for k in range(3):
            await nc.publish("fetchtest.x", str(k).encode())
        await nc.flush()
        batch = await asyncio.wait_for(waiting, timeout=10)  # never waits out its 30 s
        assert [m.data for m in batch] == [b"0", b"1", b"2"]
        for msg in batch:
            await msg.ack()


@pytest.mark.parametrize("gather", [False, True])
async def test_a_lone_message_comes_without_waiting_for_more(
    js: JetStreamContext, sub: JetStreamContext.PullSubscription, gather: bool
) -> None:
    await js.publish("fetchtest.x", b"only")
    batch = await asyncio.wait_for(
        fetch_ready(sub, 1000, 30.0, gather=gather), timeout=10
    )  # the ask after it ends at once
    assert [m.data for m in batch] == [b"only"]
    await batch[0].ack()
    await js.publish("fetchtest.x", b"next")
    nxt = await asyncio.wait_for(fetch_ready(sub, 1000, 30.0, gather=gather), timeout=10)
    assert [m.data for m in nxt] == [b"next"]  # no status left over from the last ask gets in the way
