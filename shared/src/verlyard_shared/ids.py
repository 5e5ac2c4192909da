"""Contracts: identifiers. Time-ordered UUIDv7 strings (sortable, unique without coordination)."""

from __future__ import annotations

import secrets
import time
import uuid


def new_id() -> str:
    """A new UUIDv7 (RFC 9562) as a canonical string: 48-bit ms clock, version, 74 random bits."""
    ms = time.time_ns() // 1_000_000
    rand = secrets.randbits(74)
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def pipeline_stream(pipeline_id: str) -> str:
    """The event-store stream that holds one pipeline's history."""
    return f"pipeline-{pipeline_id}"


def agent_stream(agent_id: str) -> str:
    """The event-store stream that holds one agent's registrations, drains and losses."""
    return f"agent-{agent_id}"


def stream_category(stream_id: str) -> str:
    """`pipeline-0193...` -> `pipeline`: the part before the first dash."""
    return stream_id.split("-", 1)[0]
