"""Adapter: publish a journal's entries to JetStream, in order, pipelined in batches, with their Nats-Msg-Id.

While NATS is away it waits and retries the same entry (attempts keep running and keep journaling);
on reconnect it replays the backlog in order. An entry NATS refuses for good (too large, rejected
by the stream) is logged and skipped so it cannot block everything behind it.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError

from verlyard_agent.journal import Journal

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
        """Publish the next entries; False when NATS failed (the failed entry and those after it are
        retried later; any of them that did arrive is deduplicated by its Nats-Msg-Id)."""
        js = self._js
        assert js is not None
        await self.journal.sync()  # one fsync for everything appended since the last batch
        entries = self.journal.peek(self.batch)
        # Pipelined: the publishes leave in order on the one connection and their acks are awaited
        # together, so a batch costs one round trip, not one per entry.
        outcomes = await asyncio.gather(
            *(
                js.publish(e.subject, bytes(e.data), headers={"Nats-Msg-Id": e.msg_id}, timeout=self.timeout_s)
                for e in entries
            ),
            return_exceptions=True,
        )
        for entry, outcome in zip(entries, outcomes, strict=True):
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
                continue
            if isinstance(outcome, BaseException):  # disconnected, timed out, no stream yet: transient here
                if isinstance(outcome, asyncio.CancelledError):
                    raise outcome
                now = time.monotonic()
                if self._failing_since is None:
                    self._failing_since = now
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
