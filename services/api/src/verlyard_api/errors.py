"""Pure core: the API's typed errors. Raised by the cores and handlers, mapped to HTTP once (http.py)."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error the client caused or must wait out: a status, a stable `code` and a human `detail`.

    `extra` holds additional JSON fields of the error body (e.g. `issues`, `pipeline_id`).
    """

    status: int = 400
    code: str = "bad_request"

    def __init__(self, detail: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.extra: dict[str, Any] = extra


class BadRequest(ApiError):
    status = 400
    code = "invalid_request"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class TooLarge(ApiError):
    status = 413
    code = "too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


class Unavailable(ApiError):
    """A backing service (Postgres) is down or too slow: 503 with Retry-After."""

    status = 503
    code = "unavailable"
