"""Entrypoint: pipeline routes. Submit, list, get, cancel, retry, and a pipeline's audit trail.

Commands load the pipeline's stream, fold it (the projector's pure `evolve`), decide (pure), append
with the stream's version, then catch the projector up to their own append and answer from the read
model, so the caller reads its own write (docs/adr/0007-api-read-models.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable
from typing import Annotated, Any, Final, Literal

import msgspec
from litestar import Request, Response, get, post
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter

from verlyard_api.adapters.pg import guarded
from verlyard_api.auth import Principal, require_owner
from verlyard_api.context import ApiContext
from verlyard_api.decide import (
    Append,
    Replay,
    Submit,
    check_idempotency_key,
    decide_cancel,
    decide_retry,
    decide_submit,
    idempotent_ids,
)
from verlyard_api.errors import BadRequest, Conflict, NotFound, UnsupportedMediaType
from verlyard_api.http import Ctx, current_request_id, member, principal_of, viewer
from verlyard_api.models import (
    CancelBody,
    EventOut,
    EventPage,
    PipelineOut,
    PipelinePage,
    PipelineSummary,
    RetryBody,
    pipeline_out,
)
from verlyard_api.openapi import (
    MAX_VERSION,
    STATUS_FILTER_PATTERN,
    OptionalBodyOperation,
    SubmitOperation,
    documented_header,
    error_responses,
)
from verlyard_api.projector import evolve
from verlyard_api.views import PIPELINE_STATUSES, PipelineView
from verlyard_shared.codec import to_public
from verlyard_shared.envelope import Envelope, Metadata, NewEvent
from verlyard_shared.events import PipelineSubmitted
from verlyard_shared.ids import pipeline_stream
from verlyard_shared.store.port import DuplicateEventId, WrongExpectedVersion
from verlyard_shared.validation import MAX_SPEC_BYTES, parse_pipeline

JSON_TYPES: Final = ("application/json",)
YAML_TYPES: Final = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
COMMAND_ATTEMPTS: Final = 5
"""A command retries its load -> decide -> append this often when the scheduler appends meanwhile."""

IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        description="Same key + same body -> the same pipeline (200); same key + another body -> 409.",
        required=False,
    ),
]


# ---- submit ----------------------------------------------------------------------------------------------


def spec_format(content_type: str | None) -> Literal["json", "yaml"]:
    """JSON for application/json (and `+json`), YAML for the YAML types; YAML (a superset of JSON) when absent."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in JSON_TYPES or media.endswith("+json"):
        return "json"
    if media in YAML_TYPES or not media:
        return "yaml"
    raise UnsupportedMediaType(
        f"a pipeline spec is sent as application/json or application/yaml, not {media!r}",
    )


@post(
    "/api/v1/pipelines",
    guards=[member],
    status_code=201,
    request_max_body_size=MAX_SPEC_BYTES,
    summary="Submit a pipeline (JSON or YAML spec)",
    operation_class=SubmitOperation,
    response_headers=[documented_header("Location", "the new pipeline's URL")],
    responses={200: ResponseSpec(PipelineOut, description="The same Idempotency-Key and body were accepted before")}
    | error_responses(400, 403, 409, 413, 415, 422),
)
async def submit_pipeline(
    request: Request[Any, Any, Any], ctx: Ctx, idempotency_key: IdempotencyKey = None
) -> Response[PipelineOut]:
    principal = principal_of(request)
    fmt = spec_format(request.headers.get("content-type"))
    body = await request.body()
    spec = parse_pipeline(body, content_type=fmt)
    key = check_idempotency_key(idempotency_key) if idempotency_key is not None else None
    if key is not None:
        pipeline_id, event_id = idempotent_ids(principal.token_id, key)
    else:
        pipeline_id, event_id = ctx.new_id(), ctx.new_id()
    command = Submit(
        pipeline_id=pipeline_id,
        event_id=event_id,
        spec=spec,
        idempotency_key=key,
        body_sha256=hashlib.sha256(body).hexdigest(),
    )
    stream = pipeline_stream(pipeline_id)
    for _ in range(COMMAND_ATTEMPTS):
        first = await _first_event(ctx, stream) if key is not None else None
        existing = first.event if first is not None and isinstance(first.event, PipelineSubmitted) else None
        decision = decide_submit(existing, command)
        if isinstance(decision, Replay):
            assert first is not None
            return await _answer(ctx, pipeline_id, first.position, status=200)
        assert isinstance(decision, Append)
        try:
            async with guarded():
                result = await ctx.store.append(stream, 0, [decision.event], _metadata(principal))
        except (WrongExpectedVersion, DuplicateEventId):
            if key is None:
                raise
            continue  # a concurrent request with the same key won the race: decide again against it
        return await _answer(
            ctx,
            pipeline_id,
            result.last_position,
            status=200 if result.duplicate else 201,
            headers={"Location": f"/api/v1/pipelines/{pipeline_id}"},
        )
    raise Conflict("the pipeline changed too often while submitting; retry", code="version_conflict")


def _metadata(principal: Principal) -> Metadata:
    return Metadata(actor=principal.actor, correlation_id=current_request_id())


async def _first_event(ctx: ApiContext, stream: str) -> Envelope | None:
    async with guarded():
        events = await ctx.store.read_stream(stream, limit=1)
    return events[0] if events else None


async def _answer(
    ctx: ApiContext, pipeline_id: str, position: int, *, status: int, headers: dict[str, str] | None = None
) -> Response[PipelineOut]:
    """Catch the projector up to `position` (read-your-writes), then answer from the read model."""
    await ctx.projector.catch_up(position)
    view = await _view(ctx, pipeline_id)
    if view is None:
        raise NotFound(f"no pipeline {pipeline_id}", pipeline_id=pipeline_id)
    return Response(pipeline_out(view), status_code=status, headers=headers or {})


async def _view(ctx: ApiContext, pipeline_id: str) -> PipelineView | None:
    return await ctx.projector.view(pipeline_id)


# ---- reads -----------------------------------------------------------------------------------------------

_LIST = """
SELECT p.id, p.name, p.status, p.created_at, p.finished_at, p.updated_at, p.labels, p.priority, p.submitted_by,
       p.submitted_position,
       (SELECT coalesce(json_object_agg(s.name, s.status ORDER BY s.ordinal), '{}'::json)
        FROM stages s WHERE s.pipeline_id = p.id) AS stage_statuses
FROM pipelines p
WHERE ($1::text[] IS NULL OR p.status = ANY($1::text[]))
  AND ($2::bigint IS NULL OR p.submitted_position < $2::bigint)
  AND ($4::text IS NULL OR strpos(p.name, $4::text) > 0)
ORDER BY p.submitted_position DESC
LIMIT $3
"""


def encode_cursor(submitted_position: int) -> str:
    return base64.urlsafe_b64encode(f"p:{submitted_position}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, number = raw.partition(":")
        if prefix != "p":
            raise ValueError(prefix)
        value = int(number)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest(
            "cursor is not valid: pass the `next` value of the previous page unchanged",
            code="invalid_cursor",
            issues=[{"path": "cursor", "message": "not a cursor returned by this API", "line": None}],
        ) from None
    return value


def parse_statuses(status: str | None) -> list[str] | None:
    if status is None or status == "":
        return None
    # Only spaces are ignored around the names: the documented pattern says exactly what is read.
    wanted = [s.strip(" ") for s in status.split(",") if s.strip(" ")]
    for s in wanted:
        if s not in PIPELINE_STATUSES:
            raise BadRequest(
                f"status {s!r} is not one of {', '.join(PIPELINE_STATUSES)}",
                issues=[{"path": "status", "message": f"unknown status {s!r}", "line": None}],
            )
    return wanted or None


NAME_SEARCH_PATTERN: Final = "^[a-z0-9-]{0,63}$"
_NAME_SEARCH: Final = re.compile(NAME_SEARCH_PATTERN)


def parse_name_search(q: str | None) -> str | None:
    """`q=`: a part of a pipeline name (names are `[a-z0-9][a-z0-9-]{0,62}`); None when empty."""
    if not q:
        return None
    if not _NAME_SEARCH.fullmatch(q):
        raise BadRequest(
            "q must be part of a pipeline name: lower-case letters, digits and '-', at most 63",
            issues=[{"path": "q", "message": "not part of a pipeline name", "line": None}],
        )
    return q


@get("/api/v1/pipelines", guards=[viewer], summary="List pipelines, newest first", responses=error_responses(400))
async def list_pipelines(
    ctx: Ctx,
    status: Annotated[
        str | None,
        QueryParameter(
            description="pending|running|succeeded|failed|cancelled; comma-separated for several",
            schema_extra={"pattern": STATUS_FILTER_PATTERN},  # documented; parse_statuses answers 400
        ),
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, QueryParameter(description="the `next` value of the previous page")] = None,
    q: Annotated[
        str | None,
        QueryParameter(
            description="only pipelines whose name contains this text",
            schema_extra={"pattern": NAME_SEARCH_PATTERN},  # documented; parse_name_search answers 400
        ),
    ] = None,
) -> PipelinePage:
    statuses = parse_statuses(status)
    name_part = parse_name_search(q)
    before = decode_cursor(cursor) if cursor else None
    async with guarded():
        rows = await ctx.pool.fetch(_LIST, statuses, before, limit + 1, name_part)
    items = [
        PipelineSummary(
            id=row["id"],
            name=row["name"],
            status=row["status"],
            created_at=row["created_at"],
            finished_at=row["finished_at"],
            updated_at=row["updated_at"],
            labels=msgspec.json.decode(row["labels"]),
            priority=row["priority"],
            submitted_by=row["submitted_by"],
            stage_statuses=msgspec.json.decode(row["stage_statuses"]),
        )
        for row in rows[:limit]
    ]
    more = len(rows) > limit
    return PipelinePage(items=items, next=encode_cursor(rows[limit - 1]["submitted_position"]) if more else None)


@get(
    "/api/v1/pipelines/{pipeline_id:str}",
    guards=[viewer],
    summary="A pipeline's full state",
    responses=error_responses(404),
)
async def get_pipeline(ctx: Ctx, pipeline_id: FromPath[str]) -> PipelineOut:
    view = await _view(ctx, pipeline_id)
    if view is None:
        raise NotFound(f"no pipeline {pipeline_id}", pipeline_id=pipeline_id)
    return pipeline_out(view)


@get(
    "/api/v1/pipelines/{pipeline_id:str}/events",
    guards=[viewer],
    responses=error_responses(400, 404),
    summary="A pipeline's events in order (audit)",
)
async def pipeline_events(
    ctx: Ctx,
    pipeline_id: FromPath[str],
    after: Annotated[
        int, QueryParameter(ge=0, le=MAX_VERSION, description="return events after this stream version")
    ] = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 1000,
) -> EventPage:
    stream = pipeline_stream(pipeline_id)
    async with guarded():
        events = await ctx.store.read_stream(stream, after_version=after, limit=limit)
        if not events and (after == 0 or await ctx.store.stream_version(stream) == 0):
            raise NotFound(f"no pipeline {pipeline_id}", pipeline_id=pipeline_id)
    return EventPage(
        items=[EventOut(**to_public(e)) for e in events],
        next=events[-1].version if len(events) == limit else None,
    )


# ---- cancel and retry ------------------------------------------------------------------------------------


async def _fold(ctx: ApiContext, pipeline_id: str) -> PipelineView | None:
    async with guarded():
        envelopes = await ctx.store.read_stream(pipeline_stream(pipeline_id))
    view: PipelineView | None = None
    for envelope in envelopes:
        view = evolve(view, envelope)
    return view


async def _command(
    ctx: ApiContext,
    principal: Principal,
    pipeline_id: str,
    decide: Callable[[PipelineView | None], list[NewEvent]],
) -> Response[PipelineOut]:
    """Load -> decide -> append with the stream's version; retried when another writer appended meanwhile."""
    for _ in range(COMMAND_ATTEMPTS):
        view = await _fold(ctx, pipeline_id)
        if view is not None:
            require_owner(principal, pipeline_id, view.submitted_by)
        events: list[NewEvent] = decide(view)
        assert view is not None  # decide raised NotFound otherwise
        if not events:
            return await _answer(ctx, pipeline_id, view.position, status=202)
        try:
            async with guarded():
                result = await ctx.store.append(
                    pipeline_stream(pipeline_id), view.version, events, _metadata(principal)
                )
        except WrongExpectedVersion:
            continue
        return await _answer(ctx, pipeline_id, result.last_position, status=202)
    raise Conflict(
        f"pipeline {pipeline_id} kept changing while the command was applied; retry", code="version_conflict"
    )


@post(
    "/api/v1/pipelines/{pipeline_id:str}/cancel",
    guards=[member],
    responses=error_responses(400, 403, 404, 409, 413),
    status_code=202,
    operation_class=OptionalBodyOperation,
    summary="Request cancellation (the scheduler stops running attempts)",
)
async def cancel_pipeline(
    request: Request[Any, Any, Any], ctx: Ctx, pipeline_id: FromPath[str], data: JSONBody[CancelBody | None] = None
) -> Response[PipelineOut]:
    principal = principal_of(request)
    reason = (data.reason if data is not None else None) or f"cancelled by {principal.name}"
    return await _command(
        ctx,
        principal,
        pipeline_id,
        lambda view: decide_cancel(view, pipeline_id=pipeline_id, event_id=ctx.new_id(), reason=reason),
    )


@post(
    "/api/v1/pipelines/{pipeline_id:str}/retry",
    guards=[member],
    responses=error_responses(400, 403, 404, 409, 413),
    status_code=202,
    operation_class=OptionalBodyOperation,
    summary="Run failed, cancelled and skipped stages again (succeeded stages are kept)",
)
async def retry_pipeline(
    request: Request[Any, Any, Any], ctx: Ctx, pipeline_id: FromPath[str], data: JSONBody[RetryBody | None] = None
) -> Response[PipelineOut]:
    principal = principal_of(request)
    stages = tuple(data.stages) if data is not None else ()
    return await _command(
        ctx,
        principal,
        pipeline_id,
        lambda view: decide_retry(view, pipeline_id=pipeline_id, event_id=ctx.new_id(), stages=stages),
    )


HANDLERS = [submit_pipeline, list_pipelines, get_pipeline, pipeline_events, cancel_pipeline, retry_pipeline]
