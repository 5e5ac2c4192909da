"""Adapter: reads what the checker needs from Postgres (the `events` table and the read models)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from soak.checker import Event, ReadModel


def _data(raw: Any) -> dict[str, Any]:
    return json.loads(raw) if isinstance(raw, str) else dict(raw)


async def load(database_url: str) -> tuple[list[Event], ReadModel]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT position, event_id, stream_id, version, type, data, actor,"
            " extract(epoch FROM recorded_at)::float8 AS t FROM events ORDER BY position"
        )
        pipelines = await conn.fetch("SELECT id, status FROM pipelines")
        stages = await conn.fetch("SELECT pipeline_id, name, status FROM stages")
    finally:
        await conn.close()
    events = [
        Event(
            position=r["position"],
            event_id=r["event_id"],
            stream_id=r["stream_id"],
            version=r["version"],
            type=r["type"],
            data=_data(r["data"]),
            actor=r["actor"],
            recorded_at=r["t"],
        )
        for r in rows
    ]
    model = ReadModel(
        pipelines={r["id"]: r["status"] for r in pipelines},
        stages={(r["pipeline_id"], r["name"]): r["status"] for r in stages},
    )
    return events, model


async def projector_caught_up(database_url: str) -> bool:
    """Whether the API's projector has applied every committed event (read models comparable)."""
    conn = await asyncpg.connect(database_url)
    try:
        head = await conn.fetchval("SELECT coalesce(max(position), 0) FROM events")
        seen = await conn.fetchval("SELECT position FROM tracking WHERE consumer = 'projector'")
    finally:
        await conn.close()
    return seen is not None and seen >= head
