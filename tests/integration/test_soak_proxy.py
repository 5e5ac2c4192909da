"""The soak's TCP fault proxy (soak/proxy.py) between a client and a real local echo server: pass,
delay (latency per chunk, order kept, not cumulative), drop (a blackhole that holds bytes and
delivers them on heal), reset (RST for open and new connections), a target that is down, and the
threaded wrapper the soak drives from its own loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator

import pytest

from soak.proxy import FaultProxy, ProxyThread


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    handlers: set[asyncio.Task[None]] = set()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()
            handlers.discard(task)

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


@contextlib.asynccontextmanager
async def proxied() -> AsyncIterator[FaultProxy]:
    async with echo_server() as port:
        proxy = FaultProxy("127.0.0.1", port)
        await proxy.start()
        try:
            yield proxy
        finally:
            await proxy.close()


@contextlib.asynccontextmanager
async def connect(proxy: FaultProxy) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        yield reader, writer
    finally:
        writer.transport.abort()


async def read_exactly(reader: asyncio.StreamReader, n: int, timeout_s: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), timeout=timeout_s)


async def until(predicate: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_pass_forwards_both_ways_and_counts_bytes() -> None:
    async with proxied() as proxy, connect(proxy) as (reader, writer):
        payload = bytes(range(256)) * 1000
        writer.write(payload)
        assert await read_exactly(reader, len(payload)) == payload
        await until(lambda: proxy.stats.bytes_up == proxy.stats.bytes_down == len(payload))
        assert proxy.stats.accepted == 1
        assert proxy.connections == 1


async def test_delay_adds_latency_per_chunk_in_order_without_adding_up() -> None:
    async with proxied() as proxy, connect(proxy) as (reader, writer):
        proxy.set_mode("delay", delay_ms=150)
        t0 = time.monotonic()
        for i in range(10):
            writer.write(f"{i:03d}".encode())
            await writer.drain()
            await asyncio.sleep(0.01)
        got = await read_exactly(reader, 30)
        took = time.monotonic() - t0
        assert got == b"".join(f"{i:03d}".encode() for i in range(10))
        # Up and down each add 150 ms; ten chunks in flight overlap (latency, not 10 x 300 ms).
        assert 0.3 <= took < 1.5, took
        proxy.set_mode("pass")
        t0 = time.monotonic()
        writer.write(b"x")
        assert await read_exactly(reader, 1) == b"x"
        assert time.monotonic() - t0 < 0.25


async def test_drop_holds_everything_and_delivers_it_in_order_on_heal() -> None:
    async with proxied() as proxy, connect(proxy) as (reader, writer):
        writer.write(b"before")
        assert await read_exactly(reader, 6) == b"before"
        proxy.set_mode("drop")
        writer.write(b"during-1")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), timeout=0.4)
        # A new connection is accepted but connects nowhere while the link is down.
        async with connect(proxy) as (reader2, writer2):
            writer2.write(b"new")
            writer.write(b"during-2")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader2.read(1), timeout=0.3)
            assert proxy.stats.accepted == 2
            assert proxy.connections == 1
            proxy.set_mode("pass")
            assert await read_exactly(reader, 16) == b"during-1during-2"
            assert await read_exactly(reader2, 3) == b"new"
            assert proxy.connections == 2


async def test_reset_closes_open_connections_and_refuses_new_ones_until_switched_back() -> None:
    async with proxied() as proxy:
        async with connect(proxy) as (reader, writer):
            writer.write(b"ping")
            assert await read_exactly(reader, 4) == b"ping"
            proxy.set_mode("reset")
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await read_exactly(reader, 1)
        assert proxy.connections == 0
        async with connect(proxy) as (reader, writer):
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await read_exactly(reader, 1)
        assert proxy.stats.reset == 2
        proxy.set_mode("pass")
        async with connect(proxy) as (reader, writer):
            writer.write(b"back")
            assert await read_exactly(reader, 4) == b"back"


async def test_a_target_that_is_down_resets_the_client() -> None:
    async with echo_server() as port:
        pass  # the port is free again: nothing listens there
    proxy = FaultProxy("127.0.0.1", port)
    await proxy.start()
    try:
        async with connect(proxy) as (reader, _):
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await read_exactly(reader, 1)
        assert proxy.stats.target_refused == 1
    finally:
        await proxy.close()


async def test_the_peer_closing_ends_the_link() -> None:
    async with proxied() as proxy:
        async with connect(proxy) as (reader, writer):
            writer.write(b"bye")
            assert await read_exactly(reader, 3) == b"bye"
        await until(lambda: proxy.connections == 0)


def test_bad_modes_are_refused() -> None:
    proxy = FaultProxy("127.0.0.1", 1)
    with pytest.raises(ValueError, match="unknown proxy mode"):
        proxy.set_mode("slow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="delay_ms"):
        proxy.set_mode("delay")


async def test_the_threaded_proxy_is_driven_from_another_thread() -> None:
    async with echo_server() as port:
        thread = ProxyThread("127.0.0.1", port)
        await asyncio.to_thread(thread.start)
        try:
            async with connect(thread.proxy) as (reader, writer):
                writer.write(b"one")
                assert await read_exactly(reader, 3) == b"one"
                switched = threading.Event()

                def drop_then_heal() -> None:
                    thread.set_mode("drop")
                    switched.set()

                await asyncio.to_thread(drop_then_heal)
                assert switched.is_set()
                writer.write(b"two")
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(reader.read(1), timeout=0.3)
                await asyncio.to_thread(thread.set_mode, "delay", 50.0)
                assert await read_exactly(reader, 3) == b"two"
                stats = await asyncio.to_thread(thread.stats)
                assert stats.bytes_up == stats.bytes_down == 6
        finally:
            await asyncio.to_thread(thread.close)
