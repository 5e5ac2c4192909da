"""Adapter: request counts and latency for /metrics, taken at the HTTP edge (every response, errors too)."""

from __future__ import annotations

import time
from contextvars import ContextVar

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from verlyard_api.promtext import OpsMetrics

_started: ContextVar[float | None] = ContextVar("verlyard_ops_started", default=None)


class TimingMiddleware:
    """Notes when a request arrived (the response hook measures from there)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            _started.set(time.perf_counter())
        await self.app(scope, receive, send)


def request_recorder(ops: OpsMetrics):  # litestar's BeforeMessageSendHookHandler
    async def record(message: Message, scope: Scope) -> None:
        if message["type"] != "http.response.start":
            return
        started = _started.get()
        elapsed = time.perf_counter() - started if started is not None else 0.0
        route = str(scope.get("path_template") or "unmatched")
        ops.request(str(scope.get("method", "")), route, int(message["status"]), elapsed)

    return record
