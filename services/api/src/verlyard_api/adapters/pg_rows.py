"""Adapter: the read-model tables <-> the projector's views (pipelines, stages, attempts, tokens)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy
from msgspec.structs import replace

from verlyard_api.projector import AttemptRow, PipelineRow, RowChange, StageRow, TokenRow, utc
from verlyard_api.views import AttemptView, PipelineView, StageView, TokenView
from verlyard_shared.codec import decode_event
from verlyard_shared.envelope import Envelope
from verlyard_shared.spec import PipelineSpec

Conn = asyncpg.Connection | PoolConnectionProxy | asyncpg.Pool

_json = msgspec.json.Encoder()
_spec_decoder = msgspec.json.Decoder(PipelineSpec)
_str_tuple = msgspec.json.Decoder(tuple[str, ...])
_int_tuple = msgspec.json.Decoder(tuple[int, ...])
_dict = msgspec.json.Decoder(dict[str, Any])
_labels = msgspec.json.Decoder(dict[str, str])


def _enc(value: object) -> str:
    return _json.encode(value).decode()


# ---- writes ----------------------------------------------------------------------------------------------

_UPSERT_PIPELINE = """
INSERT INTO pipelines (id, name, status, labels, priority, spec, submitted_by, correlation_id, idempotency_key,
                       created_at, updated_at, finished_at, cancel_requested, reason, failed_stages, retries,
                       version, position, submitted_position)
VALUES ($1, $2, $3, $4::jsonb, $5, $6::json, $7, $8, $9, $10, $11, $12, $13, $14, $15::jsonb, $16, $17, $18, $19)
ON CONFLICT (id) DO UPDATE SET
    name = EXCLUDED.name, status = EXCLUDED.status, labels = EXCLUDED.labels, priority = EXCLUDED.priority,
    spec = EXCLUDED.spec, submitted_by = EXCLUDED.submitted_by, correlation_id = EXCLUDED.correlation_id,
    idempotency_key = EXCLUDED.idempotency_key, created_at = EXCLUDED.created_at,
    updated_at = EXCLUDED.updated_at, finished_at = EXCLUDED.finished_at,
    cancel_requested = EXCLUDED.cancel_requested, reason = EXCLUDED.reason,
    failed_stages = EXCLUDED.failed_stages, retries = EXCLUDED.retries, version = EXCLUDED.version,
    position = EXCLUDED.position, submitted_position = EXCLUDED.submitted_position
"""

_UPSERT_STAGE = """
INSERT INTO stages (pipeline_id, name, ordinal, kind, needs, "when", priority, status, pending_reason, reason,
                    outputs, not_before, checkpoint_step, checkpoint_path, finished_at)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11::json, $12, $13, $14, $15)
ON CONFLICT (pipeline_id, name) DO UPDATE SET
    ordinal = EXCLUDED.ordinal, kind = EXCLUDED.kind, needs = EXCLUDED.needs, "when" = EXCLUDED."when",
    priority = EXCLUDED.priority, status = EXCLUDED.status, pending_reason = EXCLUDED.pending_reason,
    reason = EXCLUDED.reason, outputs = EXCLUDED.outputs, not_before = EXCLUDED.not_before,
    checkpoint_step = EXCLUDED.checkpoint_step, checkpoint_path = EXCLUDED.checkpoint_path,
    finished_at = EXCLUDED.finished_at
"""

_UPSERT_ATTEMPT = """
INSERT INTO attempts (pipeline_id, stage, id, ordinal, number, agent, status, gpus, placed_at, started_at,
                      finished_at, exit_code, failure_class, reason, resumed_from_step, resume_from_path, step,
                      total_steps)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
ON CONFLICT (pipeline_id, stage, id) DO UPDATE SET
    ordinal = EXCLUDED.ordinal, number = EXCLUDED.number, agent = EXCLUDED.agent, status = EXCLUDED.status,
    gpus = EXCLUDED.gpus, placed_at = EXCLUDED.placed_at, started_at = EXCLUDED.started_at,
    finished_at = EXCLUDED.finished_at, exit_code = EXCLUDED.exit_code, failure_class = EXCLUDED.failure_class,
    reason = EXCLUDED.reason, resumed_from_step = EXCLUDED.resumed_from_step,
    resume_from_path = EXCLUDED.resume_from_path, step = EXCLUDED.step, total_steps = EXCLUDED.total_steps
"""

_UPSERT_TOKEN = """
INSERT INTO tokens (id, name, role, created_at, created_by, position) VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, role = EXCLUDED.role, created_at = EXCLUDED.created_at,
    created_by = EXCLUDED.created_by, position = EXCLUDED.position
"""


def _pipeline_args(v: PipelineView) -> tuple[Any, ...]:
    return (
        v.id,
        v.name,
        v.status,
        _enc(v.labels),
        v.priority,
        _enc(v.spec),
        v.submitted_by,
        v.correlation_id,
        v.idempotency_key,
        v.created_at,
        v.updated_at,
        v.finished_at,
        v.cancel_requested,
        v.reason,
        _enc(v.failed_stages),
        v.retries,
        v.version,
        v.position,
        v.submitted_position,
    )


def _stage_args(pipeline_id: str, ordinal: int, s: StageView) -> tuple[Any, ...]:
    return (
        pipeline_id,
        s.name,
        ordinal,
        s.kind,
        _enc(s.needs),
        s.when,
        s.priority,
        s.status,
        s.pending_reason,
        s.reason,
        _enc(s.outputs),
        s.not_before,
        s.checkpoint_step,
        s.checkpoint_path,
        s.finished_at,
    )


def _attempt_args(pipeline_id: str, stage: str, ordinal: int, a: AttemptView) -> tuple[Any, ...]:
    return (
        pipeline_id,
        stage,
        a.id,
        ordinal,
        a.number,
        a.agent,
        a.status,
        _enc(a.gpus),
        a.placed_at,
        a.started_at,
        a.finished_at,
        a.exit_code,
        a.failure_class,
        a.reason,
        a.resumed_from_step,
        a.resume_from_path,
        a.step,
        a.total_steps,
    )


async def write_changes(conn: Conn, changes: Iterable[RowChange]) -> None:
    """Upsert the rows, one executemany per table (the caller holds the transaction)."""
    pipelines: list[tuple[Any, ...]] = []
    stages: list[tuple[Any, ...]] = []
    attempts: list[tuple[Any, ...]] = []
    tokens: list[tuple[Any, ...]] = []
    for change in changes:
        match change:
            case PipelineRow(view=v):
                pipelines.append(_pipeline_args(v))
            case StageRow(pipeline_id=pid, ordinal=n, stage=s):
                stages.append(_stage_args(pid, n, s))
            case AttemptRow(pipeline_id=pid, stage=name, ordinal=n, attempt=a):
                attempts.append(_attempt_args(pid, name, n, a))
            case TokenRow(token=t):
                tokens.append((t.id, t.name, t.role, t.created_at, t.created_by, t.position))
    for sql, rows in ((_UPSERT_PIPELINE, pipelines), (_UPSERT_STAGE, stages), (_UPSERT_ATTEMPT, attempts)):
        if rows:
            await conn.executemany(sql, rows)
    if tokens:
        await conn.executemany(_UPSERT_TOKEN, tokens)


# ---- reads -----------------------------------------------------------------------------------------------


# One round trip per load: each pipeline row with its stages (in order) and, inside each stage, its
# attempts (in order), as JSON that msgspec decodes straight into the views.
_LOAD = """
SELECT p.*,
       coalesce((
           SELECT jsonb_agg(
                      to_jsonb(s) || jsonb_build_object('attempts', coalesce((
                          SELECT jsonb_agg(to_jsonb(a) ORDER BY a.ordinal)
                          FROM attempts a WHERE a.pipeline_id = s.pipeline_id AND a.stage = s.name
                      ), '[]'::jsonb))
                      ORDER BY s.ordinal)
           FROM stages s WHERE s.pipeline_id = p.id
       ), '[]'::jsonb) AS stage_views
FROM pipelines p
WHERE p.id = ANY($1::text[])
"""
_stage_views = msgspec.json.Decoder(list[StageView])


async def load_views(conn: Conn, ids: Sequence[str]) -> dict[str, PipelineView]:
    """The stored views of `ids` (absent ids are left out), stages in pipeline order, attempts in order."""
    if not ids:
        return {}
    rows = await conn.fetch(_LOAD, list(ids))
    views: dict[str, PipelineView] = {}
    for row in rows:
        stages = [_utc_stage(stage) for stage in _stage_views.decode(row["stage_views"])]
        views[row["id"]] = _pipeline(row, {stage.name: stage for stage in stages})
    return views


def _utc_stage(stage: StageView) -> StageView:
    """Times in JSON carry the session's UTC offset; the views (and asyncpg's records) hold UTC."""
    if _is_utc(stage.not_before) and _is_utc(stage.finished_at) and all(map(_utc_attempt_ok, stage.attempts)):
        return stage
    return replace(
        stage,
        not_before=_utc(stage.not_before),
        finished_at=_utc(stage.finished_at),
        attempts=tuple(
            replace(a, placed_at=_utc(a.placed_at), started_at=_utc(a.started_at), finished_at=_utc(a.finished_at))
            for a in stage.attempts
        ),
    )


def _utc_attempt_ok(attempt: AttemptView) -> bool:
    return _is_utc(attempt.placed_at) and _is_utc(attempt.started_at) and _is_utc(attempt.finished_at)


def _is_utc(value: datetime | None) -> bool:
    return value is None or value.tzinfo is UTC


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value)


def assemble(
    pipelines: Iterable[asyncpg.Record], stage_rows: Iterable[asyncpg.Record], attempt_rows: Iterable[asyncpg.Record]
) -> dict[str, PipelineView]:
    attempts: dict[tuple[str, str], list[AttemptView]] = {}
    for row in attempt_rows:
        attempts.setdefault((row["pipeline_id"], row["stage"]), []).append(_attempt(row))
    stages: dict[str, dict[str, StageView]] = {}
    for row in stage_rows:
        key = (row["pipeline_id"], row["name"])
        stages.setdefault(row["pipeline_id"], {})[row["name"]] = _stage(row, tuple(attempts.get(key, ())))
    return {row["id"]: _pipeline(row, stages.get(row["id"], {})) for row in pipelines}


def _pipeline(row: asyncpg.Record, stages: dict[str, StageView]) -> PipelineView:
    return PipelineView(
        id=row["id"],
        name=row["name"],
        spec=_spec_decoder.decode(row["spec"]),
        labels=_labels.decode(row["labels"]),
        priority=row["priority"],
        status=row["status"],
        submitted_by=row["submitted_by"],
        correlation_id=row["correlation_id"],
        idempotency_key=row["idempotency_key"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
        cancel_requested=row["cancel_requested"],
        reason=row["reason"],
        failed_stages=_str_tuple.decode(row["failed_stages"]),
        retries=row["retries"],
        version=row["version"],
        submitted_position=row["submitted_position"],
        position=row["position"],
        stages=stages,
    )


def _stage(row: asyncpg.Record, attempts: tuple[AttemptView, ...]) -> StageView:
    return StageView(
        name=row["name"],
        kind=row["kind"],
        needs=_str_tuple.decode(row["needs"]),
        when=row["when"],
        priority=row["priority"],
        status=row["status"],
        pending_reason=row["pending_reason"],
        reason=row["reason"],
        outputs=_dict.decode(row["outputs"]),
        not_before=row["not_before"],
        checkpoint_step=row["checkpoint_step"],
        checkpoint_path=row["checkpoint_path"],
        finished_at=row["finished_at"],
        attempts=attempts,
    )


def _attempt(row: asyncpg.Record) -> AttemptView:
    return AttemptView(
        id=row["id"],
        number=row["number"],
        agent=row["agent"],
        status=row["status"],
        gpus=_int_tuple.decode(row["gpus"]),
        placed_at=row["placed_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        exit_code=row["exit_code"],
        failure_class=row["failure_class"],
        reason=row["reason"],
        resumed_from_step=row["resumed_from_step"],
        resume_from_path=row["resume_from_path"],
        step=row["step"],
        total_steps=row["total_steps"],
    )


def token_from_row(row: asyncpg.Record) -> TokenView:
    return TokenView(
        id=row["id"],
        name=row["name"],
        role=row["role"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        position=row["position"],
    )


# ---- events ------------------------------------------------------------------------------------------------

EVENT_COLUMNS = (
    "position, event_id, stream_id, version, recorded_at, actor, correlation_id, causation_id, schema_version, data"
)


def envelope_from_row(row: asyncpg.Record) -> Envelope:
    """An `events` row as an Envelope (the data column is the tagged event's JSON text)."""
    return Envelope(
        position=row["position"],
        event_id=row["event_id"],
        stream_id=row["stream_id"],
        version=row["version"],
        recorded_at=row["recorded_at"],
        actor=row["actor"],
        correlation_id=row["correlation_id"],
        causation_id=row["causation_id"],
        schema_version=row["schema_version"],
        event=decode_event(row["data"]),
    )
