"""Entrypoint: a pipeline's live stream (Server-Sent Events): its events from the log, then live, with its
metric points and log lines as they are stored. Every message's `id` is the whole cursor after it
(`e<version>.m<metric id>.l<log id>`, verlyard_api/cursor.py), so reconnecting with Last-Event-ID loses
nothing and repeats nothing (docs/adr/0009-live-streams.md).

Messages: `event: <event type>` (data: the public audit shape), `event: metrics` (data: {"points": [...]}),
`event: logs` (data: {"lines": [...]}), and a last `event: end` once the pipeline has finished and its
telemetry went quiet.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Final

import msgspec
import structlog
from litestar import get
from litestar.openapi.spec import Schema
from litestar.openapi.spec.enums import OpenAPIType
from litestar.params import FromPath, HeaderParameter, QueryParameter
from litestar.response import ServerSentEventMessage
from msgspec.structs import replace

from verlyard_api.adapters.pg import DB_TIMEOUT_S, guarded
from verlyard_api.adapters.pg_telemetry import logs_after, metrics_after, pipeline_status
from verlyard_api.adapters.pg_telemetry_listen import wait_any
from verlyard_api.context import ApiContext
from verlyard_api.cursor import StreamCursor, decode_cursor
from verlyard_api.errors import NotFound
from verlyard_api.http import Ctx, EventStream, viewer
from verlyard_api.models import EventPage
from verlyard_api.openapi import (
    MAX_VERSION,
    STREAM_CURSOR_PATTERN,
    component,
    error_responses,
    event_stream,
    sse_event,
)
from verlyard_api.services import Services, Svc
from verlyard_api.views import PIPELINE_TERMINAL
from verlyard_shared.codec import to_public
from verlyard_shared.events import event_type
from verlyard_shared.ids import pipeline_stream
from verlyard_shared.store.port import StoreUnavailable

log = structlog.get_logger("verlyard.api.stream")

EVENT_BATCH: Final = 500
TELEMETRY_BATCH: Final = 1000
"""Metric points (or log lines) per message at most."""
POLL_S: Final = 1.0
KEEPALIVE_S: Final = 15.0
END_GRACE_S: Final = 2.0
"""After the pipeline finished, telemetry still in flight gets this long to arrive before `end`."""
RETRY_MS: Final = 1000
_FINISHED: Final = frozenset({"pipeline.succeeded", "pipeline.failed", "pipeline.cancelled"})

_json = msgspec.json.Encoder()

_STRING = Schema(type=OpenAPIType.STRING)
_INTEGER = Schema(type=OpenAPIType.INTEGER)
_POINT = Schema(
    type=OpenAPIType.OBJECT,
    required=["id", "stage", "attempt", "step", "key", "value"],
    properties={
        "id": _INTEGER,
        "stage": _STRING,
        "attempt": _STRING,
        "step": _INTEGER,
        "key": _STRING,
        "value": Schema(type=[OpenAPIType.NUMBER, OpenAPIType.NULL]),
    },
)
_LINE = Schema(
    type=OpenAPIType.OBJECT,
    required=["id", "stage", "attempt", "offset", "stream", "text"],
    properties={
        "id": _INTEGER,
        "stage": _STRING,
        "attempt": _STRING,
        "offset": _INTEGER,
        "stream": _STRING,
        "text": _STRING,
    },
)


_ID = r"^e[0-9]+\.m[0-9]+\.l[0-9]+$"


def _one(name: str, value: Schema) -> Schema:
    """`{name: value}`: the data of the metrics, logs and end messages."""
    return Schema(type=OpenAPIType.OBJECT, required=[name], properties={name: value})


@get(
    "/api/v1/pipelines/{pipeline_id:str}/stream",
    guards=[viewer],
    summary="A pipeline's live stream: events, metric points and log lines as Server-Sent Events",
    description="Each message's `id` is a cursor; reconnect with `Last-Event-ID` (or `?cursor=`) to resume "
    "exactly after it. The response is `text/event-stream`: `event: <event type>` (data: an audit event), "
    "`event: metrics`, `event: logs`, and a last `event: end`.",
    responses=error_responses(400, 404),
    operation_class=event_stream(
        Schema(
            one_of=[
                sse_event(
                    component("EventOut"),
                    event=Schema(type=OpenAPIType.STRING, schema_not=Schema(enum=["metrics", "logs", "end"])),
                    id_pattern=_ID,
                ),
                sse_event(
                    _one("points", Schema(type=OpenAPIType.ARRAY, items=_POINT)),
                    event=Schema(const="metrics"),
                    id_pattern=_ID,
                ),
                sse_event(
                    _one("lines", Schema(type=OpenAPIType.ARRAY, items=_LINE)),
                    event=Schema(const="logs"),
                    id_pattern=_ID,
                ),
                sse_event(_one("cursor", _STRING), event=Schema(const="end"), id_pattern=_ID),
            ]
        ),
        json_twin=False,
    ),
)
async def pipeline_stream_route(
    ctx: Ctx,
    svc: Svc,
    pipeline_id: FromPath[str],
    cursor: Annotated[
        str | None,
        QueryParameter(
            schema_extra={"pattern": STREAM_CURSOR_PATTERN},  # documented; decode_cursor answers 400 invalid_cursor
            description="resume after this message id (as Last-Event-ID)",
        ),
    ] = None,
    metrics: Annotated[bool, QueryParameter(description="include metric points")] = True,
    logs: Annotated[bool, QueryParameter(description="include log lines")] = True,
    last_event_id: Annotated[
        str,
        HeaderParameter(
            name="Last-Event-ID",
            required=False,
            schema_extra={"pattern": STREAM_CURSOR_PATTERN},
            description="resume after this message id",
        ),
    ] = "",
) -> EventPage:
    start = decode_cursor(last_event_id) if last_event_id else decode_cursor(cursor, field="cursor")
    async with guarded():
        status = await pipeline_status(ctx.pool, pipeline_id)
    if status is None:
        raise NotFound(f"no pipeline {pipeline_id}", pipeline_id=pipeline_id)
    messages = follow(ctx, svc, pipeline_id, start, finished=status in PIPELINE_TERMINAL, metrics=metrics, logs=logs)
    return EventStream(messages)  # type: ignore[return-value]  # an SSE response; the schema documents the events


async def follow(
    ctx: ApiContext,
    svc: Services,
    pipeline_id: str,
    cursor: StreamCursor,
    *,
    finished: bool,
    metrics: bool = True,
    logs: bool = True,
) -> AsyncIterator[ServerSentEventMessage]:
    stream_id = pipeline_stream(pipeline_id)
    yield ServerSentEventMessage(
        comment=f"verlyard pipeline {pipeline_id} from {cursor.encode()}", retry=RETRY_MS, data=None
    )
    quiet_since = time.monotonic()
    while True:
        armed = [ctx.wakeup.arm(), svc.telemetry.arm(pipeline_id)]
        try:
            async with guarded(DB_TIMEOUT_S):
                # Versions are Postgres integers: a cursor past the largest one reads nothing (not an overflow).
                after = min(cursor.events, MAX_VERSION)
                envelopes = await ctx.store.read_stream(stream_id, after_version=after, limit=EVENT_BATCH)
                points = await metrics_after(ctx.pool, pipeline_id, cursor.metrics, TELEMETRY_BATCH) if metrics else []
                lines = await logs_after(ctx.pool, pipeline_id, cursor.logs, TELEMETRY_BATCH) if logs else []
        except StoreUnavailable as exc:
            log.warning("stream_waiting_for_postgres", error=str(exc))
            yield ServerSentEventMessage(comment="database unavailable; waiting", data=None)
            await wait_any(armed, POLL_S)
            continue
        for envelope in envelopes:
            cursor = replace(cursor, events=envelope.version)
            kind = event_type(envelope.event)
            if kind in _FINISHED:
                finished = True
            elif kind == "pipeline.retry_requested":
                finished = False
            yield ServerSentEventMessage(
                id=cursor.encode(), event=kind, data=_json.encode(to_public(envelope)).decode()
            )
        if points:
            cursor = replace(cursor, metrics=points[-1].id)
            yield ServerSentEventMessage(
                id=cursor.encode(), event="metrics", data=_json.encode({"points": points}).decode()
            )
        if lines:
            cursor = replace(cursor, logs=lines[-1].id)
            yield ServerSentEventMessage(id=cursor.encode(), event="logs", data=_json.encode({"lines": lines}).decode())
        now = time.monotonic()
        if envelopes or points or lines:
            quiet_since = now
            if len(envelopes) == EVENT_BATCH or len(points) == TELEMETRY_BATCH or len(lines) == TELEMETRY_BATCH:
                continue
        elif finished and now - quiet_since >= END_GRACE_S:
            yield ServerSentEventMessage(
                id=cursor.encode(), event="end", data=_json.encode({"cursor": cursor.encode()}).decode()
            )
            return
        elif now - quiet_since >= KEEPALIVE_S:
            quiet_since = now - END_GRACE_S
            yield ServerSentEventMessage(comment="keep-alive", data=None)
        await wait_any(armed, POLL_S if not finished else END_GRACE_S / 4)


HANDLERS = [pipeline_stream_route]
