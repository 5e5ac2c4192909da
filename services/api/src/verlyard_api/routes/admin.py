"""Entrypoint: administration. `POST /api/v1/admin/replay?verify=true` compares the read models with a
replay of the log; without `verify` it rebuilds them from the log (`verlyard replay [--verify]`)."""

from __future__ import annotations

from typing import Annotated, Final

from litestar import post
from litestar.params import QueryParameter

from verlyard_api.http import Ctx, admin
from verlyard_api.models import DifferenceOut, ReplayOut
from verlyard_api.openapi import error_responses

MAX_DIFFERENCES: Final = 1000
"""A report lists at most this many differences (`truncated` says when there were more)."""


@post(
    "/api/v1/admin/replay",
    guards=[admin],
    status_code=200,
    summary="Verify or rebuild the read models",
    responses=error_responses(400, 403),
)
async def replay(
    ctx: Ctx,
    verify: Annotated[
        bool, QueryParameter(description="true: compare and report only; false: rebuild every read model from the log")
    ] = False,
) -> ReplayOut:
    if verify:
        await ctx.projector.catch_up()
        report = await ctx.projector.verify()
    else:
        report = await ctx.projector.rebuild()
    differences = [
        DifferenceOut(kind=d.kind, id=d.id, field=d.field, expected=d.expected, found=d.found)
        for d in report.differences[:MAX_DIFFERENCES]
    ]
    return ReplayOut(
        mode="verify" if verify else "rebuild",
        ok=not report.differences,
        position=report.position,
        pipelines=report.pipelines,
        tokens=report.tokens,
        differences=differences,
        truncated=len(report.differences) > MAX_DIFFERENCES,
    )


HANDLERS = [replay]
