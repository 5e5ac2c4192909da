"""Adapter: the HTTP edge. One exception handler maps every typed error to the JSON error shape once;
request ids (X-Request-Id in and out, bound in structlog's context); bearer-token authentication;
role guards. Routes live in `verlyard_api.routes`."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Final, TypeAlias

import structlog
from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.response import ServerSentEvent
from litestar.response.base import ASGIResponse
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from verlyard_api.adapters.pg import is_unavailable, start_request_budget
from verlyard_api.auth import Principal, Role, bearer_token, require_role
from verlyard_api.context import ApiContext
from verlyard_api.errors import ApiError, Unauthorized
from verlyard_shared.ids import new_id
from verlyard_shared.store.port import DuplicateEventId, WrongExpectedVersion
from verlyard_shared.validation import SpecError, SpecTooLarge

log = structlog.get_logger("verlyard.api.http")

REQUEST_ID_HEADER: Final = "x-request-id"
_REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
RETRY_AFTER_S: Final = "1"
PUBLIC_OPT: Final = "public"
"""Route handler opt: `opt={"public": True}` serves it without a token (only /healthz)."""

Ctx: TypeAlias = NamedDependency[ApiContext]
"""The handlers' `ctx` dependency (store, projector, tokens), provided by the composition root."""

request_id_var: ContextVar[str | None] = ContextVar("verlyard_request_id", default=None)
_started_var: ContextVar[float | None] = ContextVar("verlyard_request_started", default=None)

_STATUS_CODES: Final = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}


def current_request_id() -> str:
    rid = request_id_var.get()
    if rid is None:
        rid = new_id()
        request_id_var.set(rid)
    return rid


# ---- errors ----------------------------------------------------------------------------------------------


def error_response(
    status_code: int,
    code: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Response[dict[str, Any]]:
    """The one error shape: `{"error": code, "detail": ..., **extra}`."""
    body: dict[str, Any] = {"error": code, "detail": detail, **(extra or {})}
    return Response(body, status_code=status_code, headers=headers or {}, media_type="application/json")


def _is_unparsable(exc: SpecError) -> bool:
    """A document that is not JSON/YAML at all (400), as opposed to a spec with wrong fields (422)."""
    return all(
        issue.path == "" and issue.message.startswith(("invalid YAML", "invalid JSON", "the document is empty"))
        for issue in exc.errors
    )


def _issues(exc: SpecError) -> list[dict[str, Any]]:
    return [{"path": i.path, "message": i.message, "line": i.line} for i in exc.errors]


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """The one place where errors become HTTP responses (house style, habit 7)."""
    match exc:
        case ApiError():
            headers: dict[str, str] = {}
            if exc.status == 401:
                headers["WWW-Authenticate"] = 'Bearer realm="verlyard"'
            if exc.status == 503:
                headers["Retry-After"] = RETRY_AFTER_S
            return error_response(exc.status, exc.code, exc.detail, headers=headers, extra=exc.extra)
        case SpecTooLarge():
            return error_response(413, "too_large", str(exc), extra={"issues": _issues(exc)})
        case SpecError():
            if _is_unparsable(exc):
                return error_response(400, "invalid_body", str(exc), extra={"issues": _issues(exc)})
            return error_response(422, "invalid_spec", str(exc), extra={"issues": _issues(exc)})
        case WrongExpectedVersion():
            return error_response(
                409,
                "version_conflict",
                f"{exc}; reload and try again",
                extra={"stream_id": exc.stream_id, "actual": exc.actual},
            )
        case DuplicateEventId():
            return error_response(409, "duplicate_event", str(exc))
        case ValidationException():
            return error_response(
                400, "invalid_request", _validation_detail(exc), extra={"issues": _validation_issues(exc)}
            )
        case HTTPException():
            status = exc.status_code
            code = _STATUS_CODES.get(status, "error" if status < 500 else "internal")
            detail = exc.detail or code.replace("_", " ")
            if status == 413:
                detail = "the request body is too large"
            headers = dict(exc.headers or {})
            if status == 401:
                headers.setdefault("WWW-Authenticate", 'Bearer realm="verlyard"')
            if status >= 500:
                return _internal(exc)
            return error_response(status, code, detail, headers=headers)
        case _ if is_unavailable(exc):
            log.warning("postgres_unavailable", error=type(exc).__name__, detail=str(exc))
            return error_response(
                503,
                "unavailable",
                "the database is unavailable; retry shortly",
                headers={"Retry-After": RETRY_AFTER_S},
            )
        case _:
            return _internal(exc)


def _internal(exc: BaseException) -> Response[dict[str, Any]]:
    rid = current_request_id()
    log.error("request_failed", error=type(exc).__name__, exc_info=exc)
    return error_response(
        500,
        "internal",
        f"an internal error occurred; quote request id {rid} when reporting it",
        extra={"request_id": rid},
    )


def _validation_issues(exc: ValidationException) -> list[dict[str, Any]]:
    issues: list[dict[str, Any]] = []
    extra = exc.extra if isinstance(exc.extra, list) else [exc.extra] if exc.extra else []
    for item in extra:
        if isinstance(item, dict):
            issues.append({"path": str(item.get("key", "")), "message": str(item.get("message", "")), "line": None})
    return issues


def _validation_detail(exc: ValidationException) -> str:
    issues = _validation_issues(exc)
    if issues:
        return "; ".join(f"{i['path'] or 'request'}: {i['message']}" for i in issues)
    return exc.detail or "invalid request"


# ---- request ids and the access log -----------------------------------------------------------------------


class RequestIdMiddleware:
    """Outermost app middleware: adopt or mint the request id, bind it to structlog, start the DB budget."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            incoming = _header(scope, b"x-request-id")
            rid = incoming if incoming and _REQUEST_ID_RE.fullmatch(incoming) else new_id()
            request_id_var.set(rid)
            _started_var.set(time.perf_counter())
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(request_id=rid)
            start_request_budget()
        await self.app(scope, receive, send)


async def before_send(message: Message, scope: Scope) -> None:
    """Every response carries X-Request-Id (error responses made outside the middleware too); one log line each."""
    if message["type"] != "http.response.start":
        return
    rid = current_request_id()
    headers = list(message.get("headers", []))
    if not any(k.lower() == b"x-request-id" for k, _ in headers):
        headers.append((b"x-request-id", rid.encode()))
        message["headers"] = headers
    started = _started_var.get()
    log.info(
        "http_request",
        method=scope.get("method"),
        path=scope.get("path"),
        status=message["status"],
        duration_ms=round((time.perf_counter() - started) * 1000, 2) if started else None,
        request_id=rid,
    )


async def allow_header(message: Message, scope: Scope) -> None:
    """OPTIONS answers `Allow` with every method of the path. Litestar's automatic OPTIONS handler belongs to
    the first handler registered for a path and lists only that handler's methods (`POST, OPTIONS` for
    /api/v1/pipelines, which has GET too); the route table knows them all."""
    if message["type"] != "http.response.start" or scope.get("method") != "OPTIONS" or message["status"] != 204:
        return
    template = scope.get("path_template")
    methods = {
        method
        for route in scope["app"].routes
        if isinstance(route, HTTPRoute) and route.path_format == template
        for method in route.methods
    }
    if not methods:
        return
    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
    headers.append((b"allow", ", ".join(sorted(methods)).encode()))
    message["headers"] = headers


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


# ---- authentication and roles -----------------------------------------------------------------------------

Authenticate = Callable[[str], Awaitable[Principal | None]]
"""Looks a token up (TokenStore.authenticate): its principal, or None when there is no such token."""


class AuthMiddleware:
    """Every route needs a valid bearer token except handlers with `opt={"public": True}` (/healthz)."""

    def __init__(self, app: ASGIApp, authenticate: Authenticate) -> None:
        self.app = app
        self._authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            handler = scope.get("route_handler")
            if handler is None or not handler.opt.get(PUBLIC_OPT, False):
                token = bearer_token(_header(scope, b"authorization"))
                principal = await self._authenticate(token)
                if principal is None:
                    raise Unauthorized("the token is not valid")
                scope["user"] = principal
                structlog.contextvars.bind_contextvars(actor=principal.actor)
        await self.app(scope, receive, send)


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    user = connection.scope.get("user")
    if not isinstance(user, Principal):  # only reachable on a public route, which never asks
        raise Unauthorized("this route needs a token")
    return user


def role_guard(
    minimum: Role,
) -> Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], Awaitable[None]]:
    # async: litestar runs a sync guard in a worker thread, a thread hop on every request.
    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        require_role(principal_of(connection), minimum)

    guard.__name__ = f"requires_{minimum}"
    return guard


viewer = role_guard("viewer")
member = role_guard("member")
admin = role_guard("admin")


# ---- streams ----------------------------------------------------------------------------------------------


class EventStream(ServerSentEvent):
    """A Server-Sent Events response that keeps `text/event-stream` even from a route whose JSON twin sets
    the handler's media type (litestar would otherwise let the handler's `application/json` win)."""

    def to_asgi_response(self, app: Any, request: Request[Any, Any, Any], **kwargs: Any) -> ASGIResponse:
        kwargs["media_type"] = "text/event-stream"
        return super().to_asgi_response(app, request, **kwargs)
