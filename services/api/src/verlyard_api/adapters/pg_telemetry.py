"""Adapter: the `metrics` and `log_lines` tables (0003_telemetry.sql): idempotent batch inserts that notify
live followers on commit, and the reads behind the metrics, logs and live-stream routes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

import asyncpg
import msgspec

from verlyard_api.adapters.pg_rows import Conn
from verlyard_api.adapters.pg_telemetry_listen import TELEMETRY_CHANNEL
from verlyard_api.telemetry import LogRow, MetricRow

METRICS_LOCK: Final = 0x76796D6574726963  # "vymetric": serialises metric inserts so ids commit in order
LOGS_LOCK: Final = 0x76796C6F676C696E  # "vyloglin"

_INSERT_METRICS = """
INSERT INTO metrics (pipeline_id, stage, attempt, step, key, value, recorded_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::float8[], $7::timestamptz[])
ON CONFLICT DO NOTHING
"""
_INSERT_LOGS = """
INSERT INTO log_lines (pipeline_id, stage, attempt, "offset", stream, text, recorded_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::timestamptz[])
ON CONFLICT DO NOTHING
"""
_NOTIFY = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p"


def _inserted(status: str) -> int:
    """`INSERT 0 <n>` -> n."""
    return int(status.rsplit(" ", 1)[-1])


async def store_metrics(pool: asyncpg.Pool, rows: Sequence[MetricRow]) -> int:
    """Insert the points (duplicates are skipped) and notify their pipelines' followers; returns rows inserted.

    The advisory lock makes ids commit in id order (a follower reading `id > n` never skips a late
    commit); NOTIFY inside the transaction is delivered at commit, when the rows are visible."""
    if not rows:
        return 0
    columns = list(zip(*(msgspec.structs.astuple(r) for r in rows), strict=True))
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", METRICS_LOCK)
        status = await conn.execute(_INSERT_METRICS, *(list(c) for c in columns))
        await conn.execute(_NOTIFY, TELEMETRY_CHANNEL, sorted({r.pipeline_id for r in rows}))
    return _inserted(status)


async def store_logs(pool: asyncpg.Pool, rows: Sequence[LogRow]) -> int:
    if not rows:
        return 0
    columns = list(zip(*(msgspec.structs.astuple(r) for r in rows), strict=True))
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOGS_LOCK)
        status = await conn.execute(_INSERT_LOGS, *(list(c) for c in columns))
        await conn.execute(_NOTIFY, TELEMETRY_CHANNEL, sorted({r.pipeline_id for r in rows}))
    return _inserted(status)


# ---- metric queries ----------------------------------------------------------------------------------


class SeriesSummary(msgspec.Struct, frozen=True, kw_only=True):
    attempt: str
    key: str
    count: int
    first_step: int
    last_step: int


async def series_summary(
    conn: Conn, pipeline_id: str, stage: str, attempts: Sequence[str] | None, keys: Sequence[str] | None
) -> list[SeriesSummary]:
    rows = await conn.fetch(
        """
        SELECT attempt, key, count(*) AS n, min(step) AS lo, max(step) AS hi FROM metrics
        WHERE pipeline_id = $1 AND stage = $2 AND ($3::text[] IS NULL OR attempt = ANY($3::text[]))
          AND ($4::text[] IS NULL OR key = ANY($4::text[]))
        GROUP BY attempt, key ORDER BY attempt, key
        """,
        pipeline_id,
        stage,
        list(attempts) if attempts is not None else None,
        list(keys) if keys is not None else None,
    )
    return [
        SeriesSummary(attempt=r["attempt"], key=r["key"], count=r["n"], first_step=r["lo"], last_step=r["hi"])
        for r in rows
    ]


async def first_steps(conn: Conn, pipeline_id: str, stage: str, attempts: Sequence[str]) -> dict[str, int]:
    """attempt -> the lowest step it recorded (any key); one index probe per attempt."""
    rows = await conn.fetch(
        """
        SELECT a.attempt, (SELECT min(m.step) FROM metrics m
                           WHERE m.pipeline_id = $1 AND m.stage = $2 AND m.attempt = a.attempt) AS lo
        FROM unnest($3::text[]) AS a(attempt)
        """,
        pipeline_id,
        stage,
        list(attempts),
    )
    return {r["attempt"]: r["lo"] for r in rows if r["lo"] is not None}


async def raw_points(
    conn: Conn, pipeline_id: str, stage: str, series: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """Every point of the (attempt, key) series, in step order."""
    out: dict[tuple[str, str], list[tuple[int, float]]] = {s: [] for s in series}
    if not series:
        return out
    rows = await conn.fetch(
        """
        SELECT m.attempt, m.key, m.step, m.value FROM metrics m
        JOIN unnest($3::text[], $4::text[]) AS s(attempt, key) ON m.attempt = s.attempt AND m.key = s.key
        WHERE m.pipeline_id = $1 AND m.stage = $2
        ORDER BY m.attempt, m.key, m.step
        """,
        pipeline_id,
        stage,
        [a for a, _ in series],
        [k for _, k in series],
    )
    for r in rows:
        out[(r["attempt"], r["key"])].append((r["step"], r["value"]))
    return out


async def bucketed_points(
    conn: Conn, pipeline_id: str, stage: str, series: Sequence[SeriesSummary], buckets: int
) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """Long series pre-aggregated in the database: each step bucket's lowest and highest value (with their
    steps), plus the series' first and last points (LTTB keeps those), so a million-point series crosses
    the wire as at most 2 x `buckets` + 2 points."""
    out: dict[tuple[str, str], list[tuple[int, float]]] = {(s.attempt, s.key): [] for s in series}
    if not series:
        return out
    rows = await conn.fetch(
        """
        SELECT m.attempt, m.key,
               min(ARRAY[m.value, m.step::float8]) AS lo, max(ARRAY[m.value, m.step::float8]) AS hi
        FROM metrics m
        JOIN unnest($3::text[], $4::text[], $5::bigint[], $6::bigint[]) AS s(attempt, key, first, last)
          ON m.attempt = s.attempt AND m.key = s.key
        WHERE m.pipeline_id = $1 AND m.stage = $2
        GROUP BY m.attempt, m.key, (m.step - s.first) * $7 / (s.last - s.first + 1)
        UNION ALL
        -- the series' own first and last points, which a bucket's extremes need not include
        SELECT m.attempt, m.key, ARRAY[m.value, m.step::float8], ARRAY[m.value, m.step::float8]
        FROM metrics m
        JOIN unnest($3::text[], $4::text[], $5::bigint[], $6::bigint[]) AS s(attempt, key, first, last)
          ON m.attempt = s.attempt AND m.key = s.key AND m.step IN (s.first, s.last)
        WHERE m.pipeline_id = $1 AND m.stage = $2
        """,
        pipeline_id,
        stage,
        [s.attempt for s in series],
        [s.key for s in series],
        [s.first_step for s in series],
        [s.last_step for s in series],
        buckets,
    )
    for r in rows:
        target = out[(r["attempt"], r["key"])]
        for value, step in (r["lo"], r["hi"]):
            target.append((int(step), value))
    return out


# ---- log queries -------------------------------------------------------------------------------------


class LogLineOut(msgspec.Struct, kw_only=True):
    offset: int
    stream: str
    text: str
    recorded_at: datetime


async def log_page(
    conn: Conn, pipeline_id: str, stage: str, attempt: str, *, offset: int, limit: int, query: str | None = None
) -> list[LogLineOut]:
    rows = await conn.fetch(
        """
        SELECT "offset", stream, text, recorded_at FROM log_lines
        WHERE attempt = $1 AND pipeline_id = $2 AND stage = $3 AND "offset" >= $4
          AND ($6::text IS NULL OR strpos(lower(text), lower($6::text)) > 0)
        ORDER BY "offset" LIMIT $5
        """,
        attempt,
        pipeline_id,
        stage,
        offset,
        limit,
        query,
    )
    return [
        LogLineOut(offset=r["offset"], stream=r["stream"], text=r["text"], recorded_at=r["recorded_at"]) for r in rows
    ]


async def latest_logged_attempt(conn: Conn, pipeline_id: str, stage: str) -> str | None:
    return await conn.fetchval(
        "SELECT attempt FROM log_lines WHERE pipeline_id = $1 AND stage = $2 ORDER BY id DESC LIMIT 1",
        pipeline_id,
        stage,
    )


# ---- the live stream ---------------------------------------------------------------------------------


class StreamMetric(msgspec.Struct, kw_only=True):
    id: int
    stage: str
    attempt: str
    step: int
    key: str
    value: float | None


class StreamLog(msgspec.Struct, kw_only=True):
    id: int
    stage: str
    attempt: str
    offset: int
    stream: str
    text: str


async def metrics_after(conn: Conn, pipeline_id: str, after: int, limit: int) -> list[StreamMetric]:
    rows = await conn.fetch(
        "SELECT id, stage, attempt, step, key, value FROM metrics WHERE pipeline_id = $1 AND id > $2 "
        "ORDER BY id LIMIT $3",
        pipeline_id,
        after,
        limit,
    )
    return [
        StreamMetric(
            id=r["id"], stage=r["stage"], attempt=r["attempt"], step=r["step"], key=r["key"], value=_finite(r["value"])
        )
        for r in rows
    ]


async def logs_after(conn: Conn, pipeline_id: str, after: int, limit: int) -> list[StreamLog]:
    rows = await conn.fetch(
        'SELECT id, stage, attempt, "offset", stream, text FROM log_lines WHERE pipeline_id = $1 AND id > $2 '
        "ORDER BY id LIMIT $3",
        pipeline_id,
        after,
        limit,
    )
    return [
        StreamLog(
            id=r["id"], stage=r["stage"], attempt=r["attempt"], offset=r["offset"], stream=r["stream"], text=r["text"]
        )
        for r in rows
    ]


def _finite(value: float) -> float | None:
    return value if value == value and value not in (float("inf"), float("-inf")) else None


class AttemptState(msgspec.Struct, frozen=True, kw_only=True):
    attempt: str | None
    status: str | None
    finished_at: datetime | None
    stage_status: str | None


async def attempt_state(conn: Conn, pipeline_id: str, stage: str, attempt: str | None) -> AttemptState:
    """The attempt's status (or, with `attempt` None, the stage's latest attempt's) and its stage's status."""
    row = await conn.fetchrow(
        """
        SELECT s.status AS stage_status, a.id, a.status, a.finished_at FROM stages s
        LEFT JOIN LATERAL (
            SELECT id, status, finished_at FROM attempts
            WHERE pipeline_id = s.pipeline_id AND stage = s.name AND ($3::text IS NULL OR id = $3::text)
            ORDER BY ordinal DESC LIMIT 1
        ) a ON true
        WHERE s.pipeline_id = $1 AND s.name = $2
        """,
        pipeline_id,
        stage,
        attempt,
    )
    if row is None:
        return AttemptState(attempt=attempt, status=None, finished_at=None, stage_status=None)
    return AttemptState(
        attempt=row["id"] or attempt,
        status=row["status"],
        finished_at=row["finished_at"],
        stage_status=row["stage_status"],
    )


async def pipeline_status(conn: Conn, pipeline_id: str) -> str | None:
    return await conn.fetchval("SELECT status FROM pipelines WHERE id = $1", pipeline_id)
