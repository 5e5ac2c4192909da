"""Entrypoint: the global event log (audit, replay): paginated JSON, or a live Server-Sent Events stream.

Nothing here, nor anywhere in the API, changes or deletes an event (the table refuses it too).
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Final

import msgspec
import structlog
from litestar import Request, get
from litestar.params import HeaderParameter, QueryParameter
from litestar.response import ServerSentEventMessage

from verlyard_api.adapters.pg import DB_TIMEOUT_S, guarded
from verlyard_api.adapters.pg_listen import Wakeup
from verlyard_api.context import ApiContext
from verlyard_api.errors import BadRequest
from verlyard_api.http import Ctx, EventStream, viewer
from verlyard_api.models import EventOut, EventPage
from verlyard_api.openapi import (
    MAX_POSITION,
    POSITION_PATTERN,
    component,
    error_responses,
    event_stream,
    sse_event,
)
from verlyard_shared.codec import to_public
from verlyard_shared.events import event_type
from verlyard_shared.store.port import StoreUnavailable

log = structlog.get_logger("verlyard.api.events")

FOLLOW_BATCH: Final = 500
POLL_S: Final = 1.0
"""A follower looks for new events at least this often (notifications usually wake it sooner)."""
KEEPALIVE_S: Final = 15.0
RETRY_MS: Final = 1000
_POSITION: Final = re.compile(r"[0-9]{1,18}")

_json = msgspec.json.Encoder()


def _wants_stream(request: Request[Any, Any, Any], follow: bool) -> bool:
    return follow or "text/event-stream" in request.headers.get("accept", "")


def _last_event_id(value: str | None) -> int | None:
    """The position of a Last-Event-ID header (POSITION_PATTERN); None when absent or empty."""
    text = (value or "").strip(" \t")
    if not text:
        return None
    if not _POSITION.fullmatch(text):
        raise BadRequest(
            "Last-Event-ID must be an event position (the `id:` of the last event received)",
            issues=[{"path": "Last-Event-ID", "message": "not an event position", "line": None}],
        )
    return int(text)


@get(
    "/api/v1/events",
    guards=[viewer],
    summary="The global event log from a position (JSON page, or a live SSE stream with follow=true)",
    responses=error_responses(400),
    operation_class=event_stream(sse_event(component("EventOut"), id_pattern="^[0-9]+$"), json_twin=True),
)
async def list_events(
    request: Request[Any, Any, Any],
    ctx: Ctx,
    after: Annotated[
        int, QueryParameter(ge=0, le=MAX_POSITION, description="return events with a position greater than this")
    ] = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    follow: Annotated[
        bool, QueryParameter(description="stream new events as Server-Sent Events (also: Accept: text/event-stream)")
    ] = False,
    last_event_id: Annotated[
        str,
        HeaderParameter(
            name="Last-Event-ID",
            required=False,
            schema_extra={"pattern": POSITION_PATTERN},  # documented; _last_event_id answers 400
            description="resume a stream after this",
        ),
    ] = "",
) -> EventPage:
    resume = _last_event_id(last_event_id)  # checked on pages too: a malformed header is a 400 either way
    if _wants_stream(request, follow):
        start = max(after, resume) if resume is not None else after
        stream = EventStream(_follow(ctx, start))
        return stream  # type: ignore[return-value]  # the SSE twin of this route
    async with guarded():
        envelopes = await ctx.store.read_all(after=after, limit=limit)
    return EventPage(
        items=[EventOut(**to_public(e)) for e in envelopes],
        next=envelopes[-1].position if len(envelopes) == limit else None,
    )


async def _follow(ctx: ApiContext, after: int) -> AsyncIterator[ServerSentEventMessage]:
    """Every event after `after`, then new ones as they commit; `id:` is the position (for Last-Event-ID)."""
    position = after
    yield ServerSentEventMessage(comment=f"verlyard events after {after}", data=None, retry=RETRY_MS)
    quiet_since = time.monotonic()
    delay = POLL_S
    while True:
        armed = ctx.wakeup.arm()
        try:
            async with guarded(DB_TIMEOUT_S):
                envelopes = await ctx.store.read_all(after=position, limit=FOLLOW_BATCH)
        except StoreUnavailable as exc:
            # Keep the stream open through a database outage; the client resumes from its last id anyway.
            log.warning("events_follow_waiting_for_postgres", error=str(exc))
            yield ServerSentEventMessage(comment="database unavailable; waiting", data=None)
            await Wakeup.wait(armed, delay)
            delay = min(delay * 2, 5.0)
            continue
        delay = POLL_S
        for envelope in envelopes:
            yield ServerSentEventMessage(
                id=envelope.position,
                event=event_type(envelope.event),
                data=_json.encode(to_public(envelope)).decode(),
            )
            position = envelope.position
        if envelopes:
            quiet_since = time.monotonic()
            if len(envelopes) == FOLLOW_BATCH:
                continue
        elif time.monotonic() - quiet_since >= KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield ServerSentEventMessage(comment="keep-alive", data=None)
        await Wakeup.wait(armed, POLL_S)


HANDLERS = [list_events]
