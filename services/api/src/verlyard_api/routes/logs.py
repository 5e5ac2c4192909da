"""Entrypoint: a stage attempt's log lines: offset pages (with a substring search), or `follow=true` as
Server-Sent Events until the attempt ends, resumable with Last-Event-ID (= the last line's offset)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import msgspec
import structlog
from litestar import Request, get
from litestar.openapi.spec import Schema
from litestar.openapi.spec.enums import OpenAPIType
from litestar.params import FromPath, HeaderParameter, QueryParameter
from litestar.response import ServerSentEventMessage

from verlyard_api.adapters.pg import DB_TIMEOUT_S, guarded
from verlyard_api.adapters.pg_telemetry import AttemptState, LogLineOut, attempt_state, latest_logged_attempt, log_page
from verlyard_api.adapters.pg_telemetry_listen import wait_any
from verlyard_api.context import ApiContext
from verlyard_api.cursor import decode_offset
from verlyard_api.http import Ctx, EventStream, viewer
from verlyard_api.openapi import (
    MAX_POSITION,
    POSITION_PATTERN,
    component,
    error_responses,
    event_stream,
    sse_event,
)
from verlyard_api.routes.metrics import load_stage, resolve_attempt
from verlyard_api.services import Services, Svc
from verlyard_api.views import ATTEMPT_ACTIVE
from verlyard_shared.store.port import StoreUnavailable

log = structlog.get_logger("verlyard.api.logs")

FOLLOW_BATCH: Final = 1000
POLL_S: Final = 1.0
KEEPALIVE_S: Final = 15.0
END_GRACE_S: Final = 2.0
"""After the attempt ended, lines still in flight get this long to arrive before the stream ends."""
GAP_WAIT_S: Final = 2.0
"""A missing offset (a batch committed out of order by another API process) is waited for this long."""
RETRY_MS: Final = 1000

_json = msgspec.json.Encoder()


class LogPage(msgspec.Struct, kw_only=True):
    pipeline_id: str
    stage: str
    attempt: str | None
    """The attempt shown (default: the stage's latest); null when the stage has none yet."""
    number: int | None
    attempt_status: str | None
    items: list[LogLineOut]
    next: int | None
    """Pass it as `offset` for the next page; null when this page reached the end (for now)."""


@get(
    "/api/v1/pipelines/{pipeline_id:str}/stages/{stage:str}/logs",
    guards=[viewer],
    summary="A stage attempt's log lines (offset pages; follow=true streams them as SSE until the attempt ends)",
    responses=error_responses(400, 404),
    operation_class=event_stream(
        Schema(
            one_of=[
                sse_event(component("LogLineOut"), event=Schema(const="log"), id_pattern="^[0-9]+$"),
                sse_event(
                    Schema(
                        type=OpenAPIType.OBJECT,
                        required=["attempt", "status", "stage_status", "next"],
                        properties={
                            "attempt": Schema(type=[OpenAPIType.STRING, OpenAPIType.NULL]),
                            "status": Schema(type=[OpenAPIType.STRING, OpenAPIType.NULL]),
                            "stage_status": Schema(type=[OpenAPIType.STRING, OpenAPIType.NULL]),
                            "next": Schema(type=OpenAPIType.INTEGER, minimum=0),
                        },
                    ),
                    event=Schema(const="end"),
                ),
            ]
        ),
        json_twin=True,
    ),
)
async def stage_logs(
    request: Request[Any, Any, Any],
    ctx: Ctx,
    svc: Svc,
    pipeline_id: FromPath[str],
    stage: FromPath[str],
    attempt: Annotated[str | None, QueryParameter(description="attempt id or number (default: the latest)")] = None,
    offset: Annotated[
        int, QueryParameter(ge=0, le=MAX_POSITION, description="the first line's offset (0-based line number)")
    ] = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=10_000)] = 1000,
    q: Annotated[
        str | None, QueryParameter(max_length=500, description="only lines containing this text (case-insensitive)")
    ] = None,
    follow: Annotated[
        bool, QueryParameter(description="stream lines as Server-Sent Events until the attempt ends")
    ] = False,
    last_event_id: Annotated[
        str,
        HeaderParameter(
            name="Last-Event-ID",
            required=False,
            schema_extra={"pattern": POSITION_PATTERN},  # documented; decode_offset answers 400
            description="resume a follow after this offset",
        ),
    ] = "",
) -> LogPage:
    resume = decode_offset(last_event_id)  # checked on pages too: a malformed header is a 400 either way
    view = await load_stage(ctx, pipeline_id, stage)
    async with guarded():
        logged = await latest_logged_attempt(ctx.pool, pipeline_id, stage)
    chosen = resolve_attempt(view, attempt, [logged] if logged else [])
    if chosen is None:
        chosen = view.current.id if view.current is not None else logged
    known = view.attempt(chosen) if chosen is not None else None
    if follow or "text/event-stream" in request.headers.get("accept", ""):
        start = resume + 1 if resume is not None else offset
        return EventStream(_follow(ctx, svc, pipeline_id, stage, chosen, start, q))  # type: ignore[return-value]
    items: list[LogLineOut] = []
    if chosen is not None:
        async with guarded():
            items = await log_page(ctx.pool, pipeline_id, stage, chosen, offset=offset, limit=limit, query=q)
    return LogPage(
        pipeline_id=pipeline_id,
        stage=stage,
        attempt=chosen,
        number=known.number if known is not None else None,
        attempt_status=known.status if known is not None else None,
        items=items,
        next=items[-1].offset + 1 if len(items) == limit else None,
    )


async def _follow(
    ctx: ApiContext, svc: Services, pipeline_id: str, stage: str, attempt: str | None, start: int, query: str | None
) -> AsyncIterator[ServerSentEventMessage]:
    """Lines from `start` on, then new ones as they commit; `id:` is each line's offset. Without an attempt
    yet, it waits for the stage's first one. Ends with an `end` event once the attempt has ended and its
    last lines had END_GRACE_S to arrive (or the stage ended without an attempt)."""
    position = start
    yield ServerSentEventMessage(comment=f"verlyard logs of {stage} from offset {start}", retry=RETRY_MS, data=None)
    quiet_since = time.monotonic()
    gap_since: float | None = None
    while True:
        armed = svc.telemetry.arm(pipeline_id)
        try:
            async with guarded(DB_TIMEOUT_S):
                state = await attempt_state(ctx.pool, pipeline_id, stage, attempt)
                attempt = attempt or state.attempt
                lines = (
                    await log_page(
                        ctx.pool, pipeline_id, stage, attempt, offset=position, limit=FOLLOW_BATCH, query=query
                    )
                    if attempt
                    else []
                )
        except StoreUnavailable as exc:
            log.warning("logs_follow_waiting_for_postgres", error=str(exc))
            yield ServerSentEventMessage(comment="database unavailable; waiting", data=None)
            await wait_any([armed], POLL_S)
            continue
        sent = 0
        for line in lines:
            gap = query is None and line.offset > position
            if gap and (gap_since is None or time.monotonic() - gap_since < GAP_WAIT_S):
                gap_since = gap_since or time.monotonic()
                break  # wait a moment for the missing lines before going past them
            gap_since = None
            yield ServerSentEventMessage(id=str(line.offset), event="log", data=_json.encode(line).decode())
            position = line.offset + 1
            sent += 1
        now = time.monotonic()
        if sent:
            quiet_since = now
            if len(lines) == FOLLOW_BATCH and sent == len(lines):
                continue
        if gap_since is None and _ended(state, now - quiet_since):
            end = {"attempt": attempt, "status": state.status, "stage_status": state.stage_status, "next": position}
            yield ServerSentEventMessage(event="end", data=_json.encode(end).decode())
            return
        if not sent and now - quiet_since >= KEEPALIVE_S:
            quiet_since = now - END_GRACE_S  # a keep-alive must not postpone the end
            yield ServerSentEventMessage(comment="keep-alive", data=None)
        await wait_any([armed], 0.2 if gap_since is not None else POLL_S)


def _ended(state: AttemptState, quiet_s: float) -> bool:
    """The attempt ended and its last lines had time to arrive; or the stage ended with no attempt at all."""
    if state.attempt is None:
        return state.stage_status is not None and state.stage_status in ("succeeded", "failed", "skipped", "cancelled")
    if state.status is None or state.status in ATTEMPT_ACTIVE:
        return False
    finished = state.finished_at
    long_ago = finished is not None and (datetime.now(UTC) - finished).total_seconds() >= END_GRACE_S
    return long_ago or quiet_s >= END_GRACE_S


HANDLERS = [stage_logs]
