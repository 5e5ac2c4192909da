"""Entrypoint: the web dashboard's routes. `/ui` and `/ui/static/<file>` serve the package's static files
without a token (they hold no data: the page asks for a token and calls the API with it); `/` sends a
browser to `/ui`. Three small API reads the page needs: `GET /api/v1/whoami` (the caller's token name and
role, to hide what the role cannot do), `GET /api/v1/events/head` and `GET /api/v1/pipelines/{id}/stream/head`
(where a live follower starts, so that it reads what is new, not the whole history again).
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any, Final

import msgspec
from litestar import Request, Response, get
from litestar.params import FromPath
from litestar.response import Redirect

from verlyard_api.adapters.pg import guarded
from verlyard_api.cursor import StreamCursor
from verlyard_api.errors import NotFound
from verlyard_api.http import PUBLIC_OPT, Ctx, principal_of, viewer
from verlyard_api.openapi import error_responses
from verlyard_shared.ids import pipeline_stream

STATIC: Final = resources.files("verlyard_api.dashboard") / "static"
_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\.(js|css|svg)")
_TYPES: Final = {
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "svg": "image/svg+xml",
}
# The page runs only its own files and talks only to its own origin: no inline script, no third party.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidate every time: an upgraded API serves its own matching page, never a stale cached one.
    "Cache-Control": "no-cache",
}
_PUBLIC: Final[dict[str, Any]] = {PUBLIC_OPT: True}


def _file(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@get("/", opt=_PUBLIC, include_in_schema=False, sync_to_thread=False)
def root() -> Redirect:
    """A browser opening the API's address lands on the dashboard."""
    return Redirect(path="/ui", status_code=307)


@get("/ui", opt=_PUBLIC, include_in_schema=False, sync_to_thread=False)
def ui_index() -> Response[bytes]:
    return Response(_file("index.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@get("/ui/static/{name:str}", opt=_PUBLIC, include_in_schema=False, sync_to_thread=False)
def ui_static(name: FromPath[str]) -> Response[bytes]:
    match = _NAME.fullmatch(name)
    if match is None or not (STATIC / name).is_file():
        raise NotFound(f"no dashboard file {name!r}")
    return Response(_file(name), media_type=_TYPES[match.group(1)], headers=SECURITY_HEADERS)


class WhoAmI(msgspec.Struct, kw_only=True):
    token_id: str
    name: str
    role: str
    actor: str
    """What this token's commands record as `actor` (members manage the pipelines submitted with it)."""


@get("/api/v1/whoami", guards=[viewer], summary="The calling token: its name and role", responses=error_responses())
async def whoami(request: Request[Any, Any, Any]) -> WhoAmI:
    principal = principal_of(request)
    return WhoAmI(token_id=principal.token_id, name=principal.name, role=principal.role, actor=principal.actor)


class EventsHead(msgspec.Struct, kw_only=True):
    position: int
    """The newest event's position (0 for an empty log): follow `/api/v1/events` from here for what is new."""


@get(
    "/api/v1/events/head",
    guards=[viewer],
    summary="The event log's newest position (where a live follower starts)",
    responses=error_responses(),
)
async def events_head(ctx: Ctx) -> EventsHead:
    async with guarded():
        position = await ctx.pool.fetchval("SELECT coalesce(max(position), 0) FROM events")
    return EventsHead(position=int(position))


class StreamHead(msgspec.Struct, kw_only=True):
    cursor: str
    """The pipeline stream's cursor now (`e<version>.m<metric id>.l<log id>`): pass it as `?cursor=` or
    Last-Event-ID to get only what comes next, after reading the current state from the other routes."""


_STREAM_HEAD = """
SELECT (SELECT max(version) FROM events WHERE stream_id = $1) AS version,
       (SELECT coalesce(max(id), 0) FROM metrics WHERE pipeline_id = $2) AS metric,
       (SELECT coalesce(max(id), 0) FROM log_lines WHERE pipeline_id = $2) AS log
"""


@get(
    "/api/v1/pipelines/{pipeline_id:str}/stream/head",
    guards=[viewer],
    summary="A pipeline's live-stream cursor now (follow the stream from here for what is new)",
    responses=error_responses(404),
)
async def stream_head(ctx: Ctx, pipeline_id: FromPath[str]) -> StreamHead:
    async with guarded():
        row = await ctx.pool.fetchrow(_STREAM_HEAD, pipeline_stream(pipeline_id), pipeline_id)
    if row is None or row["version"] is None:
        raise NotFound(f"no pipeline {pipeline_id}", pipeline_id=pipeline_id)
    cursor = StreamCursor(events=row["version"], metrics=row["metric"], logs=row["log"])
    return StreamHead(cursor=cursor.encode())


HANDLERS = [root, ui_index, ui_static, whoami, events_head, stream_head]
