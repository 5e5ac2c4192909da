"""Adapter: a durable pull consumer read through a pull request kept open (the scheduler's reports).

`fetch_ready` (nats_fetch.py) asks the server for every batch: a long poll for the first message,
then a second request for those behind it, a round trip (~1.1 ms p50 in a W1 trace) before the
scheduler can commit what came. `OpenPull` instead keeps one pull request open, with room for
`batch` messages and a life of `expires_s`, and renews it when it is used up, ends (408) or is about
to expire. The server pushes each message into the subscription's queue the moment it is stored,
so a burst (a quick stage's accepted, started, finished) arrives behind its first message with no
request in between. `next_batch` waits for one message, then lets the event loop turn until the
queue stops growing (two quiet turns, at most `BURST_TURNS`), and while the last message says more
of its burst are on their way (the agent's `Vy-Burst-Left` header), waits for them (at most
`BURST_WAIT_S` each), and hands over all of it.

Messages may be delivered while the caller is busy: they wait in the queue, inside their ack
deadline, and come with the next batch. `run_out` lets the open request end before unsubscribing
(docs/adr/0019-fetch-ready.md, later note) so none is delivered to a subscription nobody reads.

The request is sent by hand on the subscription's own inbox (`nats_fetch.send_pull_request`:
nats-py's `fetch` opens a new request per call and waits for it to fill), and read from the inner
subscription's queue (nats-py's `_sub`, `_pending_queue`, `_pending_size`).
tests/integration/test_nats_fetch.py would catch a nats-py that renames them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from verlyard_shared.nats_fetch import send_pull_request

BURST_TURNS = 16
"""Event-loop turns a burst's reader (the agent's publisher, `OpenPull`) yields at most for its rest."""
BURST_HEADER = "Vy-Burst-Left"
"""Set by the agent's journal publisher on every message: how many more it launched right behind this
one. A batch whose last message says more are coming waits for them (at most BURST_WAIT_S)."""
BURST_WAIT_S = 0.05
"""How long a batch waits for the rest of a burst its last message announced (a lost publish, or one
the agent retries later, must not hold the batch)."""
RENEW_MARGIN_S = 0.05
"""A request this close to its expiry is renewed before the next wait (its 408 may be on the way)."""


async def until_quiet(measure: Callable[[], int], max_turns: int = BURST_TURNS) -> None:
    """Yield to the event loop until `measure()` stops growing: two quiet turns in a row, at most
    `max_turns`, never a timed wait (-1 stops at once). The agent's publisher waits so for the rest of
    the burst of appends that woke it, and `OpenPull` for the rest of a burst of messages."""
    quiet = 0
    last = measure()
    for _ in range(max_turns):
        if last < 0:
            return
        await asyncio.sleep(0)
        now = measure()
        quiet = quiet + 1 if now == last else 0
        last = now
        if quiet >= 2:
            return


def _burst_left(msg: Msg) -> int:
    try:
        return int((msg.headers or {}).get(BURST_HEADER, 0))
    except ValueError:
        return 0


class OpenPull:
    def __init__(
        self,
        sub: JetStreamContext.PullSubscription,
        *,
        batch: int,
        expires_s: float,
        burst_wait_s: float = BURST_WAIT_S,
    ) -> None:
        self._sub = sub
        self._burst_wait_s = burst_wait_s
        self._inner = sub._sub  # pyright: ignore[reportPrivateUsage]
        self._batch = batch
        self._expires_s = expires_s
        self._room = 0
        """Messages the open request may still bring (0: none is open, as far as we know)."""
        self._until = 0.0
        """time.monotonic() when the open request expires on the server."""

    async def _ensure_request(self) -> None:
        if self._room > 0 and time.monotonic() < self._until - RENEW_MARGIN_S:
            return
        await send_pull_request(self._sub, {"batch": self._batch, "expires": int(self._expires_s * 1e9)})
        self._room = self._batch
        self._until = time.monotonic() + self._expires_s

    def _admit(self, msg: Msg, into: list[Msg]) -> None:
        if JetStreamContext.is_status_msg(msg) is not None:
            # 408 (the request expired), 409 (a leader change, too many waiting...): it is over. A
            # late status of a request already renewed only costs one more request.
            self._room = 0
            return
        self._room = max(0, self._room - 1)
        into.append(msg)

    def _drain(self, into: list[Msg]) -> None:
        queue = self._inner._pending_queue  # pyright: ignore[reportPrivateUsage]
        while not queue.empty() and len(into) < self._batch:
            msg = queue.get_nowait()
            self._inner._pending_size -= len(msg.data)  # pyright: ignore[reportPrivateUsage]
            queue.task_done()
            self._admit(msg, into)

    async def next_batch(self, timeout: float) -> list[Msg]:
        """Up to `batch` messages: the first within `timeout` (else nats-py's TimeoutError), then the
        rest of its burst."""
        msgs: list[Msg] = []
        deadline = time.monotonic() + timeout
        self._drain(msgs)
        while not msgs:
            await self._ensure_request()
            now = time.monotonic()
            if now >= deadline:
                raise nats.errors.TimeoutError
            try:
                msg = await self._inner.next_msg(timeout=max(0.001, min(deadline, self._until) - now))
            except nats.errors.TimeoutError:
                if time.monotonic() >= self._until:
                    self._room = 0  # it expired unused: renew it
                continue
            self._admit(msg, msgs)
        await self._settle(msgs)
        while len(msgs) < self._batch and _burst_left(msgs[-1]) > 0:
            await self._ensure_request()
            try:
                msg = await self._inner.next_msg(timeout=self._burst_wait_s)
            except nats.errors.TimeoutError:
                break
            before = len(msgs)
            self._admit(msg, msgs)
            if len(msgs) == before:
                break  # a status ended the request: the rest comes with the next batch
            await self._settle(msgs)
        return msgs

    async def _settle(self, msgs: list[Msg]) -> None:
        def taken() -> int:
            self._drain(msgs)
            return len(msgs) if len(msgs) < self._batch else -1  # -1: full, stop at once

        await until_quiet(taken)

    async def run_out(self) -> list[Msg]:
        """Wait until the open request has ended (its life), returning what it still brought."""
        msgs: list[Msg] = []
        while self._room > 0 and time.monotonic() < self._until:
            try:
                msg = await self._inner.next_msg(timeout=max(0.001, self._until - time.monotonic()))
            except nats.errors.TimeoutError:
                break
            self._admit(msg, msgs)
        self._drain(msgs)
        return msgs
