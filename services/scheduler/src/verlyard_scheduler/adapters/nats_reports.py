"""Adapter: the scheduler's durable pull consumer of agent reports (`scheduler-reports` on VY_REPORTS).

Read through one pull request kept open (`OpenPull`): a report is pushed to us the moment it is
stored, and a quick stage's burst of three comes as one batch with no request in between (ADR 0019,
later notes). One batch is in the loop's hands at a time: the next is taken only once the loop has
taken the previous one; reports delivered meanwhile wait in the subscription, inside their ack
deadline (`backoff[0]`), and come with the next batch.
Settling is the loop's job: ack after the append committed, nak with a delay when it failed, term a
poison message. Decoding and the subject check live here, at the edge.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import msgspec
import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from verlyard_shared import codec
from verlyard_shared.nats_pull import OpenPull
from verlyard_shared.reports import AnyReport
from verlyard_shared.subjects import CONSUMER_SCHEDULER_REPORTS, PREFIX, STREAM_REPORTS

log = structlog.get_logger("verlyard.scheduler.reports")


class PoisonReport(ValueError):
    """A report message that can never be admitted (undecodable, or an agent speaking for another)."""


def decode(msg: Msg) -> AnyReport:
    """The report in `msg`, checked against its subject `vy.rpt.<agent>.<kind>` (an agent reports only
    for itself: the subject is what NATS permissions vouch for, the body is what the agent claims)."""
    try:
        report = codec.decode_report(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise PoisonReport(f"undecodable report: {exc}") from None
    parts = msg.subject.split(".")
    if len(parts) != 4 or parts[0] != PREFIX or parts[1] != "rpt" or parts[2] != report.agent:
        raise PoisonReport(f"report of agent {report.agent!r} arrived on subject {msg.subject!r}")
    return report


class ReportInbox:
    """Fetches report messages for the leader's loop; `take()` hands over what arrived."""

    def __init__(
        self, js: JetStreamContext, *, wake: Callable[[], None], batch: int = 1000, fetch_s: float = 0.5
    ) -> None:
        self._js = js
        self._fetch_s = fetch_s
        """How long one pull request waits on the server (also how long a closing inbox may wait)."""
        self._wake = wake
        self._batch = batch
        self._ready: list[Msg] = []
        self._taken = asyncio.Event()
        self._taken.set()
        self._closing = False

    def close(self) -> None:
        """Stop after the fetch under way returns (its pull request expires on the server within
        `fetch_s`, so no message is left delivered to a subscription nobody reads); what it brings is
        handed back by `release`."""
        self._closing = True
        self._taken.set()

    async def release(self, held: list[Msg]) -> None:
        """Hand back (nak, no delay) what the inbox holds and `held`: a term that ends alive lets the next
        leader have them now, not after the ack deadline. A message already acked ignores the nak."""
        for msg in [*self._ready, *held]:
            with contextlib.suppress(Exception):
                await msg.nak()
        self._ready = []

    def take(self) -> list[Msg]:
        msgs, self._ready = self._ready, []
        self._taken.set()
        return msgs

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch until `stop` is set; NATS trouble (no consumer yet, a reconnect) is logged and retried."""
        sub: JetStreamContext.PullSubscription | None = None
        pull: OpenPull | None = None
        delay = 0.1
        try:
            while not stop.is_set() and not self._closing:
                try:
                    if sub is None or pull is None:
                        sub = await self._js.pull_subscribe_bind(
                            durable=CONSUMER_SCHEDULER_REPORTS, stream=STREAM_REPORTS
                        )
                        pull = OpenPull(sub, batch=self._batch, expires_s=self._fetch_s)
                    await self._taken.wait()
                    if self._closing:
                        break
                    msgs = await pull.next_batch(self._fetch_s)
                    delay = 0.1
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # nats-py raises many types; every one is retried after a pause
                    log.warning(
                        "reports_fetch_failed", error=type(exc).__name__, detail=str(exc)[:200], retry_in_s=delay
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=delay)
                    delay = min(delay * 2, 2.0)
                    continue
                if msgs:
                    self._ready.extend(msgs)
                    self._taken.clear()
                    self._wake()
            if pull is not None:
                # What the open request still brings is handed back by `release`, not left delivered.
                with contextlib.suppress(Exception):
                    self._ready.extend(await pull.run_out())
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
