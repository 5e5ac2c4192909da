"""Pure core: the live stream's cursor, the `id:` of every SSE message (docs/adr/0009-live-streams.md).

A pipeline's stream merges three ordered sources: its events (by stream version), its metric points
and its log lines (by their tables' ids, which commit in order). Every message carries the whole
cursor after it, `e<version>.m<metric id>.l<log id>`, so a client that reconnects with Last-Event-ID
resumes each source exactly where it stopped: nothing lost, nothing repeated.
"""

from __future__ import annotations

import re
from typing import Final

import msgspec

from verlyard_api.errors import BadRequest

_CURSOR: Final = re.compile(r"e([0-9]{1,18})\.m([0-9]{1,18})\.l([0-9]{1,18})")
_OFFSET: Final = re.compile(r"[0-9]{1,18}")
_BLANK: Final = " \t"
"""Only spaces and tabs around a cursor are ignored (what the OpenAPI patterns say; ASCII digits only)."""


class StreamCursor(msgspec.Struct, frozen=True, kw_only=True):
    events: int = 0
    """The pipeline stream's version last sent."""
    metrics: int = 0
    """`metrics.id` last sent."""
    logs: int = 0
    """`log_lines.id` last sent."""

    def encode(self) -> str:
        return f"e{self.events}.m{self.metrics}.l{self.logs}"


def decode_cursor(value: str | None, *, field: str = "Last-Event-ID") -> StreamCursor:
    """The cursor of a Last-Event-ID header (or `cursor` parameter, STREAM_CURSOR_PATTERN in openapi.py); the
    start when absent or empty."""
    text = (value or "").strip(_BLANK)
    if not text:
        return StreamCursor()
    match = _CURSOR.fullmatch(text)
    if match is None:
        raise BadRequest(
            f"{field} must be the `id` of a message of this stream (e<version>.m<id>.l<id>), not {value!r}",
            code="invalid_cursor",
            issues=[{"path": field, "message": "not a stream cursor", "line": None}],
        )
    events, metrics, logs = (int(g) for g in match.groups())
    return StreamCursor(events=events, metrics=metrics, logs=logs)


def decode_offset(value: str | None, *, field: str = "Last-Event-ID") -> int | None:
    """A log follower's Last-Event-ID: the offset of the last line received (None when absent)."""
    text = (value or "").strip(_BLANK)
    if not text:
        return None
    if not _OFFSET.fullmatch(text):  # not str.isdigit(): it accepts "²", which int() refuses
        raise BadRequest(
            f"{field} must be the offset of the last line received, not {value!r}",
            code="invalid_cursor",
            issues=[{"path": field, "message": "not a line offset", "line": None}],
        )
    return int(text)
