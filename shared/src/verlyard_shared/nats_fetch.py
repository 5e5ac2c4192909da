"""Adapter: take what a durable pull consumer has ready, at once (every service's pull loop uses it).

nats-py's `PullSubscription.fetch(n)` with n > 1 returns only when n messages came or the server ended
the pull request with a status (404 no messages, 408 expired). Measured against nats-server 2.15.1
(docs/adr/0019-fetch-ready.md): a message that lands on an open request is then often held in the
client until the request expires (up to 0.45 s of a 0.5 s fetch), with the message already delivered.
So: wait for ONE message (`fetch(1)`, a long poll that returns the moment one arrives), then take
exactly as many more as its metadata says the consumer holds (`num_pending`: already stored, so that
request fills at once), up to `batch`.
"""

from __future__ import annotations

import contextlib

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext


def _pending_after(msg: Msg) -> int:
    """How many messages the consumer held beyond `msg` when it was delivered (0 if not JetStream's)."""
    try:
        return int(msg.metadata.num_pending)
    except Exception:  # not a JetStream message (never in practice)
        return 0


async def fetch_ready(sub: JetStreamContext.PullSubscription, batch: int, timeout: float) -> list[Msg]:
    """Up to `batch` messages: the first to arrive within `timeout` (else nats-py's timeout error is
    raised, as `fetch` does), then those already waiting behind it, without waiting for more."""
    msgs = await sub.fetch(1, timeout=timeout)
    more = min(_pending_after(msgs[-1]), batch - 1)
    if more > 0:
        # Another reader of the consumer may take some first: then this returns what it got by `timeout`.
        with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
            msgs.extend(await sub.fetch(more, timeout=timeout))
    return msgs
