"""Bench (edge): a lean HTTP/1.1 keep-alive client for the workloads' requests.

The load generator shares the machine's two cores with the system it measures, so it must cost little:
httpx spent ~1 ms of CPU per GET and 3.5-4 ms per POST with 100 in flight here, more than the API
spent answering them (docs/benchmarks.md). This client speaks just what the API answers with (a status
line, headers, a `Content-Length` or chunked body) over a small pool of kept-alive connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import msgspec

_json = msgspec.json.Encoder()


class HttpError(Exception):
    """The server closed the connection mid-answer, or answered something this client does not read."""


class _Stale(HttpError):
    """A kept-alive connection the server had closed before it read the request (safe to send again)."""


@dataclass
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def raise_for_status(self) -> None:
        if self.status >= 400:
            raise HttpError(f"the API answered {self.status}: {self.text[:300]}")


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self, head: bytes, body: bytes) -> tuple[Response, bool]:
        """The response, and whether the connection may be used again."""
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise _Stale("the server closed the connection before answering")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        status = int(parts[1])
        length: int | None = None
        chunked = False
        keep = True
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and value.lower() == b"close":
                keep = False
        if chunked:
            payload = bytearray()
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()  # the empty trailer line
                    break
                payload += await self.reader.readexactly(size)
                await self.reader.readline()
            return Response(status, bytes(payload)), keep
        if length is None:
            return Response(status, await self.reader.read()), False  # ends with the connection
        return Response(status, await self.reader.readexactly(length)), keep

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class LeanClient:
    """At most `connections` kept-alive connections to `host:port`; every request sends `headers`."""

    def __init__(self, host: str, port: int, *, headers: dict[str, str], connections: int = 16) -> None:
        self.host = host
        self.port = port
        self._extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(connections)

    async def get(self, path: str, params: dict[str, Any] | None = None) -> Response:
        if params:
            path += "?" + "&".join(f"{k}={v}" for k, v in params.items())
        return await self._send("GET", path, b"")

    async def post_json(self, path: str, doc: Any) -> Response:
        return await self._send("POST", path, _json.encode(doc), "Content-Type: application/json\r\n")

    async def _send(self, method: str, path: str, body: bytes, more: str = "") -> Response:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self._extra}{more}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        async with self._slots:
            while True:
                reused = bool(self._idle)
                conn = self._idle.pop() if reused else await self._connect()
                try:
                    response, keep = await conn.request(head, body)
                except (_Stale, ConnectionResetError, BrokenPipeError):
                    conn.close()
                    if reused:
                        continue  # the server's keep-alive timeout closed it while idle: a fresh one
                    raise
                except BaseException:
                    conn.close()
                    raise
                if keep:
                    self._idle.append(conn)
                else:
                    conn.close()
                return response

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return _Connection(reader, writer)

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
