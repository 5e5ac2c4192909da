"""Entrypoint: a stage's training metrics, per key and attempt, downsampled, with one effective curve
across resumes (rolled-back steps marked)."""

from __future__ import annotations

from typing import Annotated, Final

from litestar import get
from litestar.params import FromPath, QueryParameter

from verlyard_api.adapters.pg import guarded
from verlyard_api.adapters.pg_telemetry import (
    SeriesSummary,
    bucketed_points,
    first_steps,
    raw_points,
    series_summary,
)
from verlyard_api.context import ApiContext
from verlyard_api.errors import NotFound
from verlyard_api.http import Ctx, viewer
from verlyard_api.openapi import error_responses
from verlyard_api.series import (
    DEFAULT_MAX_POINTS,
    AttemptSpan,
    MetricsOut,
    bucket_count,
    build_metrics,
    merge_buckets,
    parse_keys,
)
from verlyard_api.views import StageView

RAW_FACTOR: Final = 4
"""A series of up to RAW_FACTOR x max_points points is read whole; longer ones are pre-aggregated in SQL."""


async def load_stage(ctx: ApiContext, pipeline_id: str, stage: str) -> StageView:
    """The stage's read model (404 for an unknown pipeline or stage)."""
    view = await ctx.projector.view(pipeline_id)
    if view is None:
        raise NotFound(f"no pipeline {pipeline_id}", pipeline_id=pipeline_id)
    found = view.stages.get(stage)
    if found is None:
        raise NotFound(f"pipeline {pipeline_id} has no stage {stage!r}", pipeline_id=pipeline_id, stage=stage)
    return found


def resolve_attempt(stage: StageView, ref: str | None, extra: list[str]) -> str | None:
    """An attempt by id or by number (`2`); None when `ref` is None; 404 when unknown."""
    if ref is None or ref == "":
        return None
    for attempt in stage.attempts:
        # isascii: str.isdigit() accepts digits such as "²" that int() refuses.
        if attempt.id == ref or (ref.isascii() and ref.isdigit() and attempt.number == int(ref)):
            return attempt.id
    if ref in extra:
        return ref
    raise NotFound(f"stage {stage.name!r} has no attempt {ref!r}", stage=stage.name, attempt=ref)


@get(
    "/api/v1/pipelines/{pipeline_id:str}/stages/{stage:str}/metrics",
    guards=[viewer],
    summary="A stage's metrics per key and attempt, downsampled, and the effective curve across resumes",
    responses=error_responses(400, 404),
)
async def stage_metrics(
    ctx: Ctx,
    pipeline_id: FromPath[str],
    stage: FromPath[str],
    attempt: Annotated[
        str | None, QueryParameter(description="one attempt, by id or number (default: every attempt)")
    ] = None,
    keys: Annotated[str | None, QueryParameter(description="comma-separated metric keys (default: all)")] = None,
    max_points: Annotated[
        int, QueryParameter(ge=3, le=100_000, description="at most this many points per series (LTTB)")
    ] = DEFAULT_MAX_POINTS,
) -> MetricsOut:
    view = await load_stage(ctx, pipeline_id, stage)
    wanted_keys = parse_keys(keys)
    async with guarded():
        summaries = await series_summary(ctx.pool, pipeline_id, stage, None, wanted_keys)
        known = [a.id for a in view.attempts]
        # Attempts with metrics that the read model does not show (yet): after the known ones, by id
        # (attempt ids are time-ordered UUIDv7s).
        extra = sorted({s.attempt for s in summaries} - set(known))
        only = resolve_attempt(view, attempt, extra)
        starts = await first_steps(ctx.pool, pipeline_id, stage, [*known, *extra])
        spans = [
            AttemptSpan(
                attempt=a.id, number=a.number, resumed_from_step=a.resumed_from_step, first_step=starts.get(a.id)
            )
            for a in sorted(view.attempts, key=lambda a: a.number)
        ]
        last = spans[-1].number if spans else 0
        spans.extend(
            AttemptSpan(attempt=aid, number=last + i, first_step=starts.get(aid)) for i, aid in enumerate(extra, 1)
        )
        chosen = [s for s in summaries if only is None or s.attempt == only]
        small = [s for s in chosen if s.count <= RAW_FACTOR * max_points]
        large: list[SeriesSummary] = [s for s in chosen if s.count > RAW_FACTOR * max_points]
        points = await raw_points(ctx.pool, pipeline_id, stage, [(s.attempt, s.key) for s in small])
        points.update(await bucketed_points(ctx.pool, pipeline_id, stage, large, bucket_count(max_points)))
    counts = {(s.attempt, s.key): s.count for s in chosen}
    aggregated = {(s.attempt, s.key) for s in large}
    series = {k: (counts[k], merge_buckets(v) if k in aggregated else v) for k, v in points.items()}
    return build_metrics(
        pipeline_id=pipeline_id,
        stage=stage,
        spans=spans,
        statuses={a.id: a.status for a in view.attempts},
        series=series,
        max_points=max_points,
        only=only,
    )


HANDLERS = [stage_metrics]
