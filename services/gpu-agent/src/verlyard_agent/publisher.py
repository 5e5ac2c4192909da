"""Adapter: publish a journal's entries to JetStream in order, a window of acks in flight, with their Nats-Msg-Id.

While NATS is away it waits and retries the same entry (attempts keep running and keep journaling);
on reconnect it replays the backlog in order. An entry NATS refuses for good (too large, rejected
by the stream) is logged and skipped so it cannot block everything behind it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import structlog
from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import BadRequestError

from verlyard_agent.journal import Journal, JournalEntry
from verlyard_shared.nats_pull import BURST_HEADER, until_quiet

log = structlog.get_logger("verlyard.agent.publisher")


class JournalPublisher:
    def __init__(self, journal: Journal, *, name: str, timeout_s: float = 5.0, batch: int = 64) -> None:
        self.journal = journal
        self.name = name
        self.timeout_s = timeout_s
        self.batch = batch
        self._wake = asyncio.Event()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._failing_since: float | None = None
        self.published = 0
        journal.on_append = self._wake.set

    def attach(self, nc: NATS) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def _ready(self) -> bool:
        return self._nc is not None and self._nc.is_connected and self.journal.backlog > 0

    async def run(self, stop: asyncio.Event) -> None:
        delay = 0.1
        while not stop.is_set():
            if not self._ready():
                self._wake.clear()
                try:
                    # Woken by an append; polled while disconnected (nats-py reconnects on its own).
                    await asyncio.wait_for(self._wake.wait(), timeout=0.25)
                except TimeoutError:
                    pass
                continue
            if await self._publish_some():
                delay = 0.1
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _publish_some(self) -> bool:
        """Publish until the journal has nothing left to send; False when NATS failed (the failed entry
        and those after it are retried later; any of them that did arrive is deduplicated by its
        Nats-Msg-Id).

        Windowed: up to `batch` publishes are in flight at once and entries journaled meanwhile are
        sent without waiting for the earlier acks (an attempt's `finished` does not queue behind the
        ack of its `started`); acks are settled strictly in journal order.
        """
        js = self._js
        assert js is not None
        in_flight: deque[tuple[JournalEntry, asyncio.Future[PubAck]]] = deque()
        launched = 0
        try:
            while True:
                self._wake.clear()  # before looking: an append landing after the look wakes the wait
                # In flight: always the oldest unpublished entries, so the backlog beyond them is news.
                if len(in_flight) < self.batch and self.journal.backlog > len(in_flight):
                    await self._gather_burst()
                    await self.journal.sync()  # one fsync for everything appended since the last one
                    room = self.batch - len(in_flight)
                    burst = [e for e in self.journal.peek(len(in_flight) + self.batch) if e.seq > launched][:room]
                    for i, entry in enumerate(burst):
                        headers = {"Nats-Msg-Id": entry.msg_id, BURST_HEADER: str(len(burst) - 1 - i)}
                        publish = js.publish(entry.subject, bytes(entry.data), headers=headers, timeout=self.timeout_s)
                        in_flight.append((entry, asyncio.ensure_future(publish)))
                        launched = entry.seq
                if not in_flight:
                    return True
                head = in_flight[0][1]
                if not head.done():
                    woken = asyncio.ensure_future(self._wake.wait())
                    try:
                        await asyncio.wait([head, woken], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        woken.cancel()
                while in_flight and in_flight[0][1].done():
                    entry, future = in_flight.popleft()
                    if not self._settle(entry, future):
                        return False
        finally:
            for _, future in in_flight:
                future.cancel()  # no longer waited for; a retry of one that landed is a duplicate

    async def _gather_burst(self) -> None:
        """Let the work that woke us finish appending before we publish (`until_quiet` on the backlog).
        A quick attempt's accepted, started and finished then share one fsync and one socket write,
        and reach the scheduler as one batch it commits in one transaction."""
        await until_quiet(lambda: self.journal.backlog)

    def _settle(self, entry: JournalEntry, future: asyncio.Future[PubAck]) -> bool:
        """Record the outcome of `entry`'s publish; False on a transient failure."""
        outcome = future.exception()
        if isinstance(outcome, MaxPayloadError | BadRequestError):
            log.error(
                "journal_entry_refused",
                journal=self.name,
                seq=entry.seq,
                subject=entry.subject,
                error=type(outcome).__name__,
                detail=str(outcome),
            )
            self.journal.skip(entry)
            return True
        if outcome is not None:  # disconnected, timed out, no stream yet: transient here
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.warning(
                    "journal_publish_failed",
                    journal=self.name,
                    backlog=self.journal.backlog,
                    error=type(outcome).__name__,
                    detail=str(outcome),
                )
            return False
        self.journal.mark_published(entry)
        self.published += 1
        if self._failing_since is not None:
            log.info(
                "journal_publish_resumed",
                journal=self.name,
                after_s=round(time.monotonic() - self._failing_since, 2),
                backlog=self.journal.backlog,
            )
            self._failing_since = None
        return True

    async def flush(self, timeout_s: float) -> bool:
        """Wait until everything journaled so far is published (True) or `timeout_s` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while self.journal.backlog > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True
