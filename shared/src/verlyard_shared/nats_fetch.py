"""Adapter: take what a durable pull consumer has ready, at once (every service's pull loop uses it).

nats-py's `PullSubscription.fetch(n)` with n > 1 returns only when n messages came or the server ended
the pull request with a status (404 no messages, 408 expired). Measured against nats-server 2.15.1
(docs/adr/0019-fetch-ready.md): a message that lands on an open request is then often held in the
client until the request expires (up to 0.45 s of a 0.5 s fetch), with the message already delivered.
So: wait for ONE message (`fetch(1)`, a long poll that returns the moment one arrives), then take
as many more as its metadata says the consumer holds (`num_pending`), up to `batch`, with one
no-wait pull request (no `expires`: the server answers at once with what it has, then a 404 status
if another reader took some first). The agent's command consumer and the API's telemetry
persisters read this way; the scheduler's report inbox keeps a pull request open instead
(nats_pull.py), so a burst comes whole without a request per batch (docs/adr/0019-fetch-ready.md).
"""

from __future__ import annotations

import json

from nats.aio.msg import Msg
from nats.js import JetStreamContext


async def send_pull_request(sub: JetStreamContext.PullSubscription, request: dict[str, int | bool]) -> None:
    """Send one pull request on the subscription's own inbox (nats-py's `fetch` opens a request per call
    and always adds `expires`). The one place that uses nats-py's private `_nc`, `_nms`, `_deliver`."""
    payload = json.dumps(request).encode()
    await sub._nc.publish(sub._nms, payload, sub._deliver)  # pyright: ignore[reportPrivateUsage]


async def _take_waiting(sub: JetStreamContext.PullSubscription, limit: int, timeout: float) -> list[Msg]:
    """Up to `limit` messages the consumer holds now, by one no-wait pull request.

    nats-py's `fetch` always sends `expires` on a fresh request, which the server treats as a long
    poll, so this one goes by `send_pull_request`. A status the server
    sends instead of messages (404 none left, 408, 409 a leader change) ends it; so does `timeout`
    (the server did not answer) or a failure of the link: anything that arrives later waits in the
    subscription's queue, where the next `fetch` takes it first, and a late status there is dropped
    by that `fetch`. Never raises, so the message the caller already holds is never lost with it.
    """
    taken: list[Msg] = []
    inbox = sub._sub  # pyright: ignore[reportPrivateUsage]
    try:
        await send_pull_request(sub, {"batch": limit, "no_wait": True})
        while len(taken) < limit:
            msg = await inbox.next_msg(timeout)
            if JetStreamContext.is_status_msg(msg) is not None:
                break
            taken.append(msg)
    except Exception:  # timed out, or the link dropped: the caller's next fetch says which
        pass  # what came is returned with the first message, never dropped with it
    return taken


def _pending_after(msg: Msg) -> int:
    """How many messages the consumer held beyond `msg` when it was delivered (0 if not JetStream's)."""
    try:
        return int(msg.metadata.num_pending)
    except Exception:  # not a JetStream message (never in practice)
        return 0


async def fetch_ready(sub: JetStreamContext.PullSubscription, batch: int, timeout: float) -> list[Msg]:
    """Up to `batch` messages: the first to arrive within `timeout` (else nats-py's timeout error is
    raised, as `fetch` does), then the `num_pending` its metadata counted behind it, without waiting
    for more (no second request for a lone message)."""
    msgs = await sub.fetch(1, timeout=timeout)
    more = min(_pending_after(msgs[-1]), batch - 1)
    if more > 0:
        msgs.extend(await _take_waiting(sub, more, timeout))
    return msgs
