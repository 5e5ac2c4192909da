"""Soak fault proxy (edge): an asyncio TCP proxy between a client and a server whose link can be slowed,
blackholed or reset on command, the netem-like faults `tc netem` cannot give us here.

Modes (`FaultProxy.set_mode`):
- `pass`: bytes flow as they come.
- `delay`: every chunk is delivered `delay_ms` after it was read, in order (latency, not a
  bandwidth cap: chunks in flight overlap, as on a long link).
- `drop`: a blackhole. New connections are accepted but nothing is forwarded either way; open
  connections stop moving. Nothing is closed and nothing is discarded: the bytes wait in the socket
  buffers (the peer's sends block once they fill), and `pass` delivers them, which is what TCP does
  across a partition that heals before the connection times out. A client that gives up meanwhile
  (its own ping timeout) closes its end and reconnects, as it would on a real network.
- `reset`: every open connection is closed with a TCP RST (SO_LINGER 0) and new ones are reset as
  soon as they are accepted, until the mode changes.

`FaultProxy` runs on the caller's event loop (tests); `ProxyThread` runs one on a loop of its own in a
daemon thread, so the link keeps moving while the soak's own loop blocks in a restart or a kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

Mode = Literal["pass", "delay", "drop", "reset"]
MODES: tuple[Mode, ...] = ("pass", "delay", "drop", "reset")
CHUNK = 64 * 1024
T = TypeVar("T")


@dataclass
class ProxyStats:
    accepted: int = 0
    reset: int = 0
    """Connections closed with a RST (open ones on `reset`, new ones while in `reset`)."""
    bytes_up: int = 0
    """Client to target, delivered."""
    bytes_down: int = 0
    """Target to client, delivered."""
    target_refused: int = 0


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a reset instead of a FIN: linger on, timeout 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One proxied connection: two pumps (up, down), each a reader and a delivering writer."""

    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter, target: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.target = target
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        for writer in (self.client, self.target):
            _rst(writer)
        for task in self.tasks:
            task.cancel()

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        """Read chunks, stamp them, and deliver each `delay_ms` after it was read (drop: hold them)."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        flowing = self.proxy.flowing

        async def read() -> None:
            while True:
                # In drop mode stop reading too, so the peer's kernel buffers fill and its sends block.
                await flowing.wait()
                chunk = await reader.read(CHUNK)
                queue.put_nowait((time.monotonic(), chunk))
                if not chunk:
                    return

        async def deliver() -> None:
            while True:
                read_at, chunk = await queue.get()
                await flowing.wait()
                if not chunk:
                    return
                # The delay in force when the chunk is delivered applies (a phase change takes effect
                # on what is in flight too, as a router's queue would).
                due = read_at + self.proxy.delay_s()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self.proxy.flowing.wait()
                writer.write(chunk)
                await writer.drain()
                if up:
                    self.proxy.stats.bytes_up += len(chunk)
                else:
                    self.proxy.stats.bytes_down += len(chunk)

        reading = asyncio.create_task(read())
        delivering = asyncio.create_task(deliver())
        try:
            done, _ = await asyncio.wait({reading, delivering}, return_when=asyncio.FIRST_EXCEPTION)
            if reading in done and reading.exception() is None and delivering not in done:
                await delivering  # the peer closed: deliver what it sent before, then end the link
        except OSError:
            pass
        finally:
            for task in (reading, delivering):
                task.cancel()
            await asyncio.gather(reading, delivering, return_exceptions=True)


class FaultProxy:
    """Listens on `host:port` (0: any free port) and forwards each connection to `target`."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self.mode: Mode = "pass"
        self.delay_ms = 0.0
        self.stats = ProxyStats()
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def delay_s(self) -> float:
        return self.delay_ms / 1000.0 if self.mode == "delay" else 0.0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def set_mode(self, mode: Mode, delay_ms: float = 0.0) -> None:
        """Switch the link; takes effect at once on every open connection and every new one."""
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}; known: {', '.join(MODES)}")
        if mode == "delay" and delay_ms <= 0:
            raise ValueError("delay needs delay_ms > 0")
        self.mode = mode
        self.delay_ms = delay_ms if mode == "delay" else 0.0
        if mode == "drop":
            self.flowing.clear()
        else:
            self.flowing.set()
        if mode == "reset":
            for link in list(self._links):
                self.stats.reset += 1
                link.reset()
            self._links.clear()

    @property
    def connections(self) -> int:
        return len(self._links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        if self.mode == "reset":
            self.stats.reset += 1
            _rst(writer)
            return
        # A blackholed link accepts but connects nowhere until it heals (the peer sees a silent socket).
        await self.flowing.wait()
        if self.mode == "reset":
            self.stats.reset += 1
            _rst(writer)
            return
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.stats.target_refused += 1
            _rst(writer)
            return
        link = _Link(self, writer, target_writer)
        self._links.add(link)
        up = asyncio.create_task(link.pump(reader, target_writer, up=True))
        down = asyncio.create_task(link.pump(target_reader, writer, up=False))
        link.tasks = [up, down]
        try:
            # A connection ends when either side closes: half-closes are not needed by NATS or Postgres.
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._links.discard(link)
            for task in link.tasks:
                task.cancel()
            for w in (writer, target_writer):
                w.transport.abort()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*link.tasks, return_exceptions=True)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.flowing.set()
        for link in list(self._links):
            link.reset()
        self._links.clear()
        for task in list(self._handlers):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2)


class ProxyThread:
    """A `FaultProxy` on its own event loop in a daemon thread; every method is safe to call from any thread."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="soak-proxy", daemon=True)
        self._proxy: FaultProxy | None = None
        self._args = (target_host, target_port, host, port)

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    @property
    def proxy(self) -> FaultProxy:
        assert self._proxy is not None, "start() first"
        return self._proxy

    @property
    def port(self) -> int:
        return self.proxy.port

    def start(self) -> None:
        self._thread.start()
        target_host, target_port, host, port = self._args

        async def make() -> FaultProxy:
            proxy = FaultProxy(target_host, target_port, host=host, port=port)
            await proxy.start()
            return proxy

        self._proxy = self._call(make())

    def set_mode(self, mode: Mode, delay_ms: float = 0.0) -> None:
        async def switch() -> None:
            self.proxy.set_mode(mode, delay_ms)

        self._call(switch())

    def stats(self) -> ProxyStats:
        async def read() -> ProxyStats:
            s = self.proxy.stats
            return ProxyStats(s.accepted, s.reset, s.bytes_up, s.bytes_down, s.target_refused)

        return self._call(read())

    def close(self) -> None:
        if self._proxy is not None and self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self.proxy.close())
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._loop.is_running():
            self._loop.close()
