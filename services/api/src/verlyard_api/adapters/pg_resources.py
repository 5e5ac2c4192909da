"""Adapter: the reads behind agents, datasets and /metrics: agent and dataset streams (folded on read
through the partial indexes of 0003_telemetry.sql), active attempts and pipeline counts (read models)."""

from __future__ import annotations

import msgspec

from verlyard_api.adapters.pg_rows import EVENT_COLUMNS, Conn, envelope_from_row
from verlyard_api.agents import ActiveAttempt
from verlyard_shared.envelope import Envelope

_int_tuple = msgspec.json.Decoder(tuple[int, ...])


async def agent_envelopes(conn: Conn, agent_id: str | None = None) -> list[Envelope]:
    """Every `agent-*` event in log order (or one agent's)."""
    if agent_id is not None:
        rows = await conn.fetch(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 ORDER BY version", f"agent-{agent_id}"
        )
    else:
        # The predicate matches the partial index `events_agent_streams` word for word.
        rows = await conn.fetch(f"SELECT {EVENT_COLUMNS} FROM events WHERE stream_id LIKE 'agent-%' ORDER BY position")
    return [envelope_from_row(row) for row in rows]


async def dataset_envelopes(conn: Conn) -> list[Envelope]:
    rows = await conn.fetch(f"SELECT {EVENT_COLUMNS} FROM events WHERE stream_id LIKE 'dataset-%' ORDER BY position")
    return [envelope_from_row(row) for row in rows]


async def active_attempts(conn: Conn, agent_id: str | None = None) -> list[ActiveAttempt]:
    """Placed, accepted and running attempts (the `attempts_agent` partial index)."""
    rows = await conn.fetch(
        """
        SELECT agent, pipeline_id, stage, id, number, status, gpus FROM attempts
        WHERE status IN ('placed', 'accepted', 'running') AND ($1::text IS NULL OR agent = $1::text)
        ORDER BY agent, placed_at NULLS LAST, pipeline_id, stage
        """,
        agent_id,
    )
    return [
        ActiveAttempt(
            agent=r["agent"],
            pipeline_id=r["pipeline_id"],
            stage=r["stage"],
            attempt=r["id"],
            number=r["number"],
            status=r["status"],
            gpus=_int_tuple.decode(r["gpus"]),
        )
        for r in rows
    ]


async def pipeline_counts(conn: Conn) -> dict[str, int]:
    rows = await conn.fetch("SELECT status, count(*) AS n FROM pipelines GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


async def head_position(conn: Conn) -> int:
    head = await conn.fetchval("SELECT coalesce(max(position), 0) FROM events")
    return int(head or 0)
